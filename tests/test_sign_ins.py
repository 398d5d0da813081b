"""Sign-ins that outlast a reload: tokens stored hashed, the idle and absolute limits, Sign out,
an admin ending them, a disabled account or a new password ending them all; and the routes
that set and clear the cookie."""

import hashlib
from datetime import timedelta
from http.cookies import SimpleCookie

import pytest
from conftest import BOTH_BACKENDS
from sqlalchemy import select
from starlette.requests import Request

from db import sign_ins
from db.schema import SignIn, utcnow
from db.session import read_scope
from db.users import TERMINAL, NotAllowed, User, add_account, set_disabled, set_password
from views.sign_in_cookie import COOKIE, HANDOVERS, begin, begin_url, can_keep, end

ANA = User("ana", "reviewer")


@pytest.fixture
def accounts(db_url):
    add_account(db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    add_account(db_url, "boss", "admin", "correct horse", user=TERMINAL)
    return db_url


@BOTH_BACKENDS
def test_a_sign_in_holds_until_sign_out_and_the_database_never_holds_the_token(accounts):
    db_url = accounts
    token = sign_ins.begin(db_url, "ana")
    with read_scope(db_url) as session:
        stored = session.scalars(select(SignIn)).one()
    assert stored.token_hash == hashlib.sha256(token.encode()).hexdigest() != token
    assert stored.expires_at == stored.created_at + timedelta(days=sign_ins.ABSOLUTE_DAYS)
    assert sign_ins.visit(db_url, token) == ANA
    assert sign_ins.visit(db_url, token + "x") is None
    sign_ins.end(db_url, token)
    assert sign_ins.visit(db_url, token) is None  # in every tab that holds it


def test_a_sign_in_ends_after_its_idle_limit_and_at_its_absolute_one(accounts):
    db_url, now = accounts, utcnow()
    sign_ins.set_limits(db_url, idle_hours=2, absolute_days=1, user=TERMINAL)
    token = sign_ins.begin(db_url, "ana", now)
    assert sign_ins.visit(db_url, token, now + timedelta(hours=1.9)) == ANA  # a visit...
    assert sign_ins.visit(db_url, token, now + timedelta(hours=3.8)) == ANA  # ...restarts it
    assert sign_ins.visit(db_url, token, now + timedelta(hours=5.9)) is None  # idle 2.1 h
    token = sign_ins.begin(db_url, "ana", now)
    for hours in range(1, 24):  # visited every hour, it still ends after a day
        assert sign_ins.visit(db_url, token, now + timedelta(hours=hours)) == ANA
    assert sign_ins.visit(db_url, token, now + timedelta(hours=24)) is None


def test_the_limits_are_an_admins_and_must_make_sense(accounts):
    db_url = accounts
    with pytest.raises(NotAllowed, match="only an admin may set how long a sign-in lasts"):
        sign_ins.set_limits(db_url, 1, 1, user=ANA)
    with pytest.raises(ValueError, match="idle limit"):
        sign_ins.set_limits(db_url, 48, 1, user=User("boss", "admin"))
    assert sign_ins.limits(db_url) == sign_ins.Limits(12.0, 7.0)


@BOTH_BACKENDS
def test_disabling_an_account_or_a_new_password_ends_its_sign_ins(accounts):
    db_url = accounts
    first, second, boss = (sign_ins.begin(db_url, name) for name in ("ana", "ana", "boss"))
    set_password(db_url, "ana", "battery staple", user=TERMINAL)
    assert sign_ins.visit(db_url, first) is None and sign_ins.visit(db_url, second) is None
    third = sign_ins.begin(db_url, "ana")
    set_disabled(db_url, "ana", True, user=TERMINAL)
    set_disabled(db_url, "ana", False, user=TERMINAL)
    assert sign_ins.visit(db_url, third) is None  # enabling again does not bring it back
    assert sign_ins.visit(db_url, boss) == User("boss", "admin")  # others keep theirs


def test_an_admin_sees_and_ends_open_sign_ins(accounts):
    db_url = accounts
    ana, boss = sign_ins.begin(db_url, "ana"), sign_ins.begin(db_url, "boss")
    sign_ins.end(db_url, sign_ins.begin(db_url, "ana"))  # signed out: not listed
    listed = sign_ins.open_sign_ins(db_url)
    assert sorted(row.account for row in listed) == ["ana", "boss"]
    ana_hash = next(row.token_hash for row in listed if row.account == "ana")
    with pytest.raises(NotAllowed):
        sign_ins.end_by_admin(db_url, [ana_hash], user=ANA)
    assert sign_ins.end_by_admin(db_url, [ana_hash], user=User("boss", "admin")) == 1
    assert sign_ins.visit(db_url, ana) is None and sign_ins.visit(db_url, boss) is not None
    assert [row.account for row in sign_ins.open_sign_ins(db_url)] == ["boss"]


def request(
    path: str,
    query: str,
    scheme: str = "http",
    host: str = "127.0.0.1:8501",
    headers: dict[str, str] | None = None,
) -> Request:
    raw = [(b"host", host.encode())] + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": path,
            "scheme": scheme,
            "query_string": query.encode(),
            "headers": raw,
            "server": (host, 8501),
        }
    )


def set_cookie(response) -> SimpleCookie:
    cookie = SimpleCookie()
    for header in response.headers.getlist("set-cookie"):
        cookie.load(header)
    return cookie


def test_the_begin_route_sets_the_cookie_once_for_a_code_and_returns_to_the_page():
    code = begin_url(HANDOVERS.put("the-token", 3600)).split("code=")[1]
    response = begin(request("/auth/begin", f"code={code}&next=%2Freview"))
    assert response.status_code == 303 and response.headers["location"] == "/review"
    morsel = set_cookie(response)[COOKIE]
    assert morsel.value == "the-token" and morsel["max-age"] == "3600"
    assert morsel["httponly"] and morsel["samesite"] == "strict" and not morsel["secure"]
    again = begin(request("/auth/begin", f"code={code}&next=%2Freview"))  # once only
    assert COOKIE not in set_cookie(again) and again.headers["location"] == "/review"


def test_behind_https_the_cookie_is_secure_and_next_never_leaves_the_server():
    code = HANDOVERS.put("the-token", 60)
    response = begin(
        request(
            "/auth/begin",
            f"code={code}&next=//evil.example/x",
            host="grading.clinic.org",
            headers={"X-Forwarded-Proto": "https"},
        )
    )
    assert set_cookie(response)[COOKIE]["secure"]
    assert response.headers["location"] == "/"
    for target in ("https://evil.example/", "evil", "//evil.example"):
        assert end(request("/auth/end", f"next={target}")).headers["location"] == "/"
    cleared = set_cookie(end(request("/auth/end", "next=/review")))[COOKIE]
    assert cleared.value == "" and cleared["max-age"] == "0"


def test_a_cookie_is_kept_only_over_https_or_on_this_machine():
    assert can_keep("http://localhost:8501/review") and can_keep("http://127.0.0.1:8501")
    assert can_keep("https://grading.clinic.org/")
    assert not can_keep("http://grading.clinic.org/") and not can_keep(None)
