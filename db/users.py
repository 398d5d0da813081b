"""Accounts and roles: who may sign in, what a role may do, and the command line that manages
them. Local passwords are stored as Argon2 hashes; failed sign-ins are counted in the database.

    python -m db.users add NAME --role reviewer|admin [--sso]
    python -m db.users list
    python -m db.users disable NAME | enable NAME | passwd NAME

The password is read without echo, or from standard input when that is not a terminal (for
scripts). `--sso` adds an identity provider's e-mail, which signs in through the provider only.
"""

import argparse
import getpass
import logging
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, or_, select, update

from cli import HelpFormatter, setup_logging
from db.schema import Account, SignIn, utcnow
from db.session import database_url, migrate, read_scope, rows_changed, session_scope, workspace_root

log = logging.getLogger(__name__)

ROLES = ("reviewer", "admin")
MIN_PASSWORD = 8
MAX_FAILURES = 5  # in a row: the account locks for LOCK_FOR
LOCK_FOR = timedelta(minutes=15)
# Before the lock, failure n makes the next try wait 2**(n-1) s: 1, 2, 4, 8 s.
REFUSED = (
    "Wrong name or password, or the account may not sign in now: after a failed try "
    f"the next waits a few seconds, and {MAX_FAILURES} in a row lock it for "
    f"{LOCK_FOR.seconds // 60} minutes (an admin lifts a lock by setting a new password)"
)
_hasher = PasswordHasher()


@dataclass(frozen=True)
class User:
    """Who acts: an account's name (a local name or an e-mail) and its role."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# The one user of a workspace that has no accounts and is served on this machine only.
LOCAL = User("local", "admin")
# Whoever runs a command line on the server (`python -m db.users`): no account, and no check,
# since the database is theirs to open anyway. A browser session never holds it: views.signin
# gives LOCAL or an account.
TERMINAL = None


class NotAllowed(Exception):
    """The user's role may not do this; the message says who and what."""


class SignInRefused(Exception):
    """A sign-in that did not succeed, and why, in words."""


class AccountError(ValueError):
    """An account command that cannot be carried out (unknown name, short password...)."""


def user_now(db_url: str, user: User) -> User | None:
    """`user` as the accounts hold them now, not as a browser session remembered them at its
    last run: None once the account is disabled or gone. LOCAL stands while no account
    exists; the first account ends it."""
    if user == LOCAL and not has_accounts(db_url):
        return LOCAL
    return find_user(db_url, user.name)


def is_admin_now(db_url: str, user: User) -> bool:
    """Whether `user` is an enabled admin now: what a fragment that ticks asks each tick, so
    that an admin demoted or disabled meanwhile loses the admin's controls within one."""
    now = user_now(db_url, user)
    return now is not None and now.is_admin


def require_admin(db_url: str, user: User | None, action: str) -> None:
    """Refuse `action` (such as "start training") to anyone but an admin, as the accounts say
    at the time of the action: a browser session keeps the role of its last run, and an admin
    demoted or disabled since must be refused at once. TERMINAL is never refused."""
    if user is TERMINAL:
        return
    now = user_now(db_url, user)
    if now is None or not now.is_admin:
        standing = "no longer an enabled account" if now is None else f"a {now.role}"
        raise NotAllowed(f"{user.name} is {standing}: only an admin may {action}")


def normalise(name: str) -> str:
    """Names and e-mails compare without case or surrounding spaces."""
    return name.strip().lower()


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")


def add_account(db_url: str, name: str, role: str, password: str | None, *, user: User | None) -> User:
    """A new account, added by `user`, an admin, or TERMINAL; `password` None makes one that
    signs in through the identity provider."""
    require_admin(db_url, user, "add accounts")
    name = normalise(name)
    if not name or len(name) > 100:
        raise AccountError("a name must have 1 to 100 characters")
    if role not in ROLES:
        raise AccountError(f"the role must be one of {', '.join(ROLES)}, not {role!r}")
    if password is not None:
        _check_password(password)
    with session_scope(db_url) as session:
        if session.get(Account, name) is not None:
            raise AccountError(f"an account named {name} exists already")
        session.add(
            Account(name=name, role=role, password_hash=None if password is None else _hasher.hash(password))
        )
    return User(name, role)


def set_password(db_url: str, name: str, password: str, *, user: User | None) -> None:
    """A new password, set by `user`, an admin, or TERMINAL; it also lifts a lock, clears
    the failed sign-ins and ends the account's open sign-ins."""
    require_admin(db_url, user, "set passwords")
    _check_password(password)
    hashed = _hasher.hash(password)
    _change(db_url, name, password_hash=hashed, failures=0, locked_until=None)
    _end_sign_ins(db_url, name)


def set_disabled(db_url: str, name: str, disabled: bool, *, user: User | None) -> None:
    """Disable or enable an account, as `user`, an admin, or TERMINAL; disabling ends its open
    sign-ins."""
    require_admin(db_url, user, "disable or enable accounts")
    _change(db_url, name, disabled=disabled)
    if disabled:
        _end_sign_ins(db_url, name)


def _end_sign_ins(db_url: str, name: str) -> None:
    """Every open sign-in of the account ends (db.sign_ins keeps them)."""
    with session_scope(db_url) as session:
        session.execute(
            update(SignIn)
            .where(SignIn.account == normalise(name), SignIn.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )


def _change(db_url: str, name: str, **values) -> None:
    with session_scope(db_url) as session:
        statement = update(Account).where(Account.name == normalise(name)).values(**values)
        if rows_changed(session, statement) == 0:
            raise AccountError(f"no account named {normalise(name)}")


def has_accounts(db_url: str) -> bool:
    """Whether any account exists, disabled ones too: disabling every account must not open
    the app to whoever reaches it."""
    with read_scope(db_url) as session:
        return session.execute(select(func.count()).select_from(Account)).scalar_one() > 0


def has_passwords(db_url: str) -> bool:
    """Whether any enabled account signs in with a password (the sign-in form is needed)."""
    with read_scope(db_url) as session:
        return (
            session.execute(
                select(func.count())
                .select_from(Account)
                .where(Account.password_hash.is_not(None), Account.disabled.is_(False))
            ).scalar_one()
            > 0
        )


def find_user(db_url: str, name: str) -> User | None:
    """The enabled account of that name or e-mail; None for an unknown or disabled one."""
    with read_scope(db_url) as session:
        account = session.get(Account, normalise(name))
        if account is None or account.disabled:
            return None
        return User(account.name, account.role)


def accounts(db_url: str) -> list[Account]:
    with read_scope(db_url) as session:
        return list(session.scalars(select(Account).order_by(Account.name)))


@cache
def _dummy_hash() -> str:
    return _hasher.hash("not a password of anyone")


def _verify(password_hash: str | None, password: str) -> bool:
    """Argon2 verification; an unknown name costs the same time as a known one."""
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


def _wait_after(failures: int) -> timedelta:
    if failures >= MAX_FAILURES:
        return LOCK_FOR
    return timedelta(seconds=2 ** (failures - 1))


def _take_attempt(db_url: str, name: str, now: datetime) -> Account | None:
    """The account, if its password may be tried now. The try is counted as a failure, and
    the wait after it set, before the password is looked at, by one conditional UPDATE: of
    guesses sent at the same moment, one gets the attempt and the rest are refused unverified.
    None for an unknown, disabled, provider-only, waiting or locked account."""
    with read_scope(db_url) as session:
        account = session.get(Account, name)
    if (
        account is None
        or account.disabled
        or account.password_hash is None
        or (account.locked_until is not None and now < account.locked_until)
    ):
        return None
    failures = account.failures + 1
    with session_scope(db_url) as session:
        taken = rows_changed(
            session,
            update(Account)
            .where(
                Account.name == name,
                Account.failures == account.failures,
                or_(Account.locked_until.is_(None), Account.locked_until <= now),
            )
            .values(failures=failures, locked_until=now + _wait_after(failures)),
        )
    return account if taken == 1 else None


def sign_in(db_url: str, name: str, password: str, now: datetime | None = None) -> User:
    """The user, when `password` is the account's; otherwise SignInRefused. Each failure
    makes the next try wait longer; MAX_FAILURES in a row lock the account for LOCK_FOR.
    Every refusal has the same words and verifies one hash (a dummy one when the password is
    not tried), so neither the message nor the time tells whether the name exists."""
    now, name = now or utcnow(), normalise(name)
    account = _take_attempt(db_url, name, now)
    password_hash = account.password_hash if account else None
    # _verify first, whatever the account: it fails without a hash, and every refusal takes its time.
    if not _verify(password_hash, password) or account is None or password_hash is None:
        raise SignInRefused(REFUSED)
    rehash = _hasher.check_needs_rehash(password_hash)
    _change(
        db_url,
        name,
        failures=0,
        locked_until=None,
        **({"password_hash": _hasher.hash(password)} if rehash else {}),
    )
    return User(account.name, account.role)


def find_provider_user(db_url: str, email: str, verified: bool) -> User | None:
    """The enabled account the identity provider's `email` signs in as: only an e-mail the
    provider verified, and only an account made for the provider (no password)."""
    with read_scope(db_url) as session:
        account = session.get(Account, normalise(email)) if verified and email else None
        if account is None or account.disabled or account.password_hash is not None:
            return None
        return User(account.name, account.role)


# The command line


def _read_password(name: str) -> str:
    """Twice without echo at a terminal; else the first line of standard input."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"Password for {name}: ")
    if getpass.getpass("Again: ") != password:
        raise AccountError("the two passwords differ")
    return password


def _list(db_url: str) -> None:
    rows = accounts(db_url)
    if not rows:
        print("No accounts: the app runs as one local admin, on this machine only.")
    for account in rows:
        how = "password" if account.password_hash else "identity provider"
        state = " · disabled" if account.disabled else ""
        locked_until = account.locked_until
        if account.failures >= MAX_FAILURES and locked_until is not None and locked_until > utcnow():
            state += f" · locked until {locked_until:%Y-%m-%d %H:%M} UTC"
        print(f"{account.name}\t{account.role}\t{how}{state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m db.users", description=__doc__, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", formatter_class=HelpFormatter, help="add an account")
    add.add_argument("name", help="a local name, or an e-mail with --sso")
    add.add_argument("--role", choices=ROLES, required=True, help="what the account may do")
    add.add_argument(
        "--sso", action="store_true", help="no password: the account signs in through the identity provider"
    )
    commands.add_parser("list", formatter_class=HelpFormatter, help="list the accounts")
    for command in ("disable", "enable", "passwd"):
        commands.add_parser(
            command, formatter_class=HelpFormatter, help=f"{command} an account"
        ).add_argument("name", help="the account's name")
    args = parser.parse_args(argv)
    setup_logging()
    db_url = database_url(workspace_root())
    migrate(db_url)
    try:
        if args.command == "add":
            password = None if args.sso else _read_password(args.name)
            user = add_account(db_url, args.name, args.role, password, user=TERMINAL)
            print(f"Added {user.name} ({user.role}).")
        elif args.command == "list":
            _list(db_url)
        elif args.command == "passwd":
            set_password(db_url, args.name, _read_password(args.name), user=TERMINAL)
            print(f"New password set for {normalise(args.name)}; any lock is lifted.")
        else:
            set_disabled(db_url, args.name, args.command == "disable", user=TERMINAL)
            print(f"{normalise(args.name)} is {args.command}d.")
    except AccountError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
