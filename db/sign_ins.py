"""Local sign-ins that outlast a reload: a random token in an HttpOnly cookie, and in the
database only its SHA-256 with the account, when it began, when it was last seen and when it
ends. A sign-in ends at its absolute limit, after its idle limit without a visit, at Sign out,
when an admin ends it, or when its account is disabled or given a new password
(db.users does that)."""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update

from db.schema import Account, SignIn, utcnow
from db.session import read_scope, rows_changed, session_scope
from db.settings import read_setting, write_setting
from db.users import User, require_admin

LIMITS_KEY = "sign_in_limits"
IDLE_HOURS = 12.0
ABSOLUTE_DAYS = 7.0
# A visit is written at most this often: every rerun of every page would otherwise write.
SEEN_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class Limits:
    """How long a sign-in lasts without a visit, and at most."""

    idle_hours: float = IDLE_HOURS
    absolute_days: float = ABSOLUTE_DAYS

    @property
    def idle(self) -> timedelta:
        return timedelta(hours=self.idle_hours)

    @property
    def absolute(self) -> timedelta:
        return timedelta(days=self.absolute_days)


def limits(db_url: str) -> Limits:
    return Limits(**(read_setting(db_url, LIMITS_KEY) or {}))


def set_limits(db_url: str, idle_hours: float, absolute_days: float, *, user: User | None) -> None:
    """New limits, set by `user`, an admin; they apply to sign-ins already open too."""
    require_admin(db_url, user, "set how long a sign-in lasts")
    if not 0 < idle_hours <= 24 * absolute_days:
        raise ValueError("the idle limit must be above 0 and within the absolute limit")
    write_setting(
        db_url, LIMITS_KEY, {"idle_hours": float(idle_hours), "absolute_days": float(absolute_days)}
    )


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def begin(db_url: str, account: str, now: datetime | None = None) -> str:
    """A new sign-in of `account` (already checked); returns its token, for the cookie."""
    now, token = now or utcnow(), secrets.token_urlsafe(32)
    with session_scope(db_url) as session:
        session.add(
            SignIn(
                token_hash=_digest(token),
                account=account,
                created_at=now,
                last_seen_at=now,
                expires_at=now + limits(db_url).absolute,
            )
        )
    return token


def _open(now: datetime, idle: timedelta):
    """The sign-ins not ended, not past their limits, of enabled accounts."""
    return (
        select(SignIn)
        .join(Account, Account.name == SignIn.account)
        .where(
            SignIn.revoked_at.is_(None),
            SignIn.expires_at > now,
            SignIn.last_seen_at > now - idle,
            Account.disabled.is_(False),
        )
    )


def visit(db_url: str, token: str, now: datetime | None = None) -> User | None:
    """The user whom `token` signs in, as the accounts hold them now; None once the sign-in
    ended. Counts as a visit for the idle limit."""
    now = now or utcnow()
    with read_scope(db_url) as session:
        found = session.execute(
            _open(now, limits(db_url).idle)
            .where(SignIn.token_hash == _digest(token))
            .add_columns(Account.role)
        ).first()
    if found is None:
        return None
    sign_in, role = found
    if now - sign_in.last_seen_at >= SEEN_EVERY:
        with session_scope(db_url) as session:
            session.execute(
                update(SignIn).where(SignIn.token_hash == sign_in.token_hash).values(last_seen_at=now)
            )
    return User(sign_in.account, role)


def end(db_url: str, token: str) -> None:
    """Sign out: the sign-in of `token` ends, in every tab that holds it."""
    with session_scope(db_url) as session:
        session.execute(
            update(SignIn)
            .where(SignIn.token_hash == _digest(token), SignIn.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )


def open_sign_ins(db_url: str, now: datetime | None = None) -> list[SignIn]:
    """Every sign-in still open, newest visit first, for the Accounts page."""
    now = now or utcnow()
    with read_scope(db_url) as session:
        return list(session.scalars(_open(now, limits(db_url).idle).order_by(SignIn.last_seen_at.desc())))


def end_by_admin(db_url: str, token_hashes: list[str], *, user: User | None) -> int:
    """End the sign-ins of these hashes, as `user`, an admin; returns how many were open."""
    require_admin(db_url, user, "end sign-ins")
    with session_scope(db_url) as session:
        return rows_changed(
            session,
            update(SignIn)
            .where(SignIn.token_hash.in_(token_hashes), SignIn.revoked_at.is_(None))
            .values(revoked_at=utcnow()),
        )
