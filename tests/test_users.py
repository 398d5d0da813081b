"""Local accounts: the command line, Argon2 hashes, wrong passwords, the slow-down and the
lock-out kept in the database, and the sign-in form."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from argon2 import PasswordHasher
from conftest import BOTH_BACKENDS, ROOT, page_text
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from db import users
from db.schema import Account, utcnow
from db.session import session_scope
from db.sign_ins import open_sign_ins
from db.users import (
    LOCK_FOR,
    MAX_FAILURES,
    TERMINAL,
    AccountError,
    SignInRefused,
    User,
    add_account,
    find_provider_user,
    find_user,
    has_accounts,
    main,
    set_disabled,
    set_password,
    sign_in,
)
from engine.runtime.markdown import literal


@pytest.fixture(autouse=True)
def quick_hashes(monkeypatch):
    """Argon2 still, with a cost that suits tests (the real one takes ~0.1-0.4 s a hash)."""
    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def cli(monkeypatch, capsys, *argv: str, stdin: str = "") -> tuple[int, str]:
    """`python -m db.users ...` with a pipe (not a terminal) as standard input."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def stored(db_url: str, name: str) -> Account:
    with session_scope(db_url) as session:
        return session.scalar(select(Account).where(Account.name == name))


def test_the_command_line_adds_lists_disables_and_sets_passwords(workspace, monkeypatch, capsys):
    db = workspace.db_url
    assert cli(monkeypatch, capsys, "list")[1].startswith("No accounts")
    assert cli(monkeypatch, capsys, "add", "Ana", "--role", "admin", stdin="correct horse\n") == (
        0,
        "Added ana (admin).\n",
    )
    account = stored(db, "ana")
    assert account.password_hash.startswith("$argon2id$")
    assert "correct horse" not in account.password_hash
    assert cli(monkeypatch, capsys, "add", "ben@clinic.org", "--role", "reviewer", "--sso")[0] == 0
    assert stored(db, "ben@clinic.org").password_hash is None  # signs in through the provider
    status, out = cli(monkeypatch, capsys, "add", "cid", "--role", "reviewer", stdin="short\n")
    assert status == 2 and "at least 8 characters" in out and stored(db, "cid") is None
    status, out = cli(monkeypatch, capsys, "add", "ANA", "--role", "reviewer", stdin="x" * 9)
    assert status == 2 and "an account named ana exists already" in out
    assert cli(monkeypatch, capsys, "disable", "ana") == (0, "ana is disabled.\n")
    out = cli(monkeypatch, capsys, "list")[1]
    assert "ana\tadmin\tpassword · disabled" in out
    assert "ben@clinic.org\treviewer\tidentity provider" in out
    with pytest.raises(SignInRefused, match="Wrong name or password"):  # no hint it exists
        sign_in(db, "ana", "correct horse")
    assert cli(monkeypatch, capsys, "enable", "ana")[0] == 0
    assert cli(monkeypatch, capsys, "passwd", "ana", stdin="battery staple\n")[0] == 0
    assert sign_in(db, "Ana ", "battery staple") == User("ana", "admin")
    status, said = cli(monkeypatch, capsys, "passwd", "nobody", stdin="battery staple\n")
    assert status == 2 and said.endswith(" ERROR no account named nobody\n")


class CountingHasher(PasswordHasher):
    """The tests' quick Argon2, which keeps the hashes it verifies, in order (an account's, or
    the dummy one), each after `delay` seconds."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=1024, parallelism=1)
        self.hashes: list[str] = []
        self.delay = 0.0

    def verify(self, password_hash, password) -> bool:
        self.hashes.append(password_hash)
        time.sleep(self.delay)
        return super().verify(password_hash, password)


@pytest.fixture
def hasher(monkeypatch) -> CountingHasher:
    monkeypatch.setattr(users, "_hasher", CountingHasher())
    return users._hasher


@BOTH_BACKENDS
def test_a_wrong_password_is_refused_and_each_failure_makes_the_next_try_wait(db_url, hasher):
    add_account(db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    ana = stored(db_url, "ana").password_hash
    now = utcnow()
    with pytest.raises(SignInRefused, match="Wrong name or password"):
        sign_in(db_url, "ana", "correct hors", now)
    # Within the wait even the right password is refused, unread; the wait grows: 1, 2, 4 s.
    with pytest.raises(SignInRefused, match="Wrong name or password"):
        sign_in(db_url, "ana", "correct horse", now)
    assert hasher.hashes.count(ana) == 1
    with pytest.raises(SignInRefused, match="Wrong name or password"):
        sign_in(db_url, "ana", "wrong", now + timedelta(seconds=1))
    with pytest.raises(SignInRefused):
        sign_in(db_url, "ana", "correct horse", now + timedelta(seconds=2))
    assert stored(db_url, "ana").failures == 2  # refusals during a wait do not count
    assert hasher.hashes.count(ana) == 2
    assert sign_in(db_url, "ana", "correct horse", now + timedelta(seconds=3)) == User("ana", "reviewer")
    assert stored(db_url, "ana").failures == 0 and stored(db_url, "ana").locked_until is None


@BOTH_BACKENDS
def test_repeated_failures_lock_the_account_in_the_database(db_url, hasher):
    add_account(db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    now = utcnow()
    for n in range(MAX_FAILURES):
        if n:
            now += timedelta(seconds=2 ** (n - 1))  # each try once its wait is over
        with pytest.raises(SignInRefused):
            sign_in(db_url, "ana", f"guess {n}", now)
    assert stored(db_url, "ana").locked_until == now + LOCK_FOR
    # The lock lives in the database: a reload, a new session, another process see it.
    with pytest.raises(SignInRefused, match="5 in a row lock it for 15 minutes"):
        sign_in(db_url, "ana", "correct horse", now + LOCK_FOR - timedelta(seconds=5))
    assert len(hasher.hashes) == MAX_FAILURES + 1 and hasher.hashes[-1] != hasher.hashes[0]  # a dummy hash
    assert sign_in(db_url, "ana", "correct horse", now + LOCK_FOR) == User("ana", "reviewer")
    for n in range(MAX_FAILURES):  # locked again; a new password lifts the lock
        with pytest.raises(SignInRefused):
            sign_in(db_url, "ana", "guess", now + LOCK_FOR + timedelta(seconds=2**n))
    with pytest.raises(SignInRefused):
        sign_in(db_url, "ana", "correct horse")
    set_password(db_url, "ana", "battery staple", user=TERMINAL)
    assert sign_in(db_url, "ana", "battery staple") == User("ana", "reviewer")


@BOTH_BACKENDS
def test_guesses_sent_at_once_are_not_all_verified(db_url, hasher):
    """12 wrong passwords at the same moment: one gets the attempt, the rest are refused
    before their password is looked at, however slow the hash."""
    add_account(db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    ana = stored(db_url, "ana").password_hash
    hasher.delay = 0.3  # every guess is in flight before the first one ends
    start, now = threading.Barrier(12), utcnow()

    def guess(n: int) -> str:
        start.wait()
        with pytest.raises(SignInRefused) as refused:
            sign_in(db_url, "ana", f"guess {n}", now)
        return str(refused.value)

    with ThreadPoolExecutor(12) as pool:
        refusals = set(pool.map(guess, range(12)))
    assert hasher.hashes.count(ana) == 1 and len(hasher.hashes) == 12
    assert refusals == {users.REFUSED}
    assert stored(db_url, "ana").failures == 1


def test_unknown_names_wrong_passwords_and_disabled_accounts_are_refused_alike(db_url, hasher):
    add_account(db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    add_account(db_url, "ben", "reviewer", "battery staple", user=TERMINAL)
    set_disabled(db_url, "ben", True, user=TERMINAL)
    now = utcnow()
    refusals = []
    for name, password in [
        ("nobody", "correct horse"),
        ("ana", "wrong one"),
        ("ben", "battery staple"),
    ]:  # ben's right password
        with pytest.raises(SignInRefused) as refused:
            sign_in(db_url, name, password, now)
        refusals.append(str(refused.value))
    assert refusals == [users.REFUSED] * 3
    assert len(hasher.hashes) == 3  # one hash each: the time does not tell them apart


def test_the_identity_provider_signs_in_only_verified_e_mails_of_its_own_accounts(db_url):
    add_account(db_url, "ana@clinic.org", "reviewer", None, user=TERMINAL)
    add_account(db_url, "ben@clinic.org", "admin", "correct horse", user=TERMINAL)
    assert find_provider_user(db_url, "Ana@Clinic.org", verified=True) == User("ana@clinic.org", "reviewer")
    assert find_provider_user(db_url, "ana@clinic.org", verified=False) is None
    assert find_provider_user(db_url, "ben@clinic.org", verified=True) is None  # a local one
    set_disabled(db_url, "ana@clinic.org", True, user=TERMINAL)
    assert find_provider_user(db_url, "ana@clinic.org", verified=True) is None


def test_disabled_accounts_still_close_the_app(db_url):
    add_account(db_url, "ana", "admin", "correct horse", user=TERMINAL)
    set_disabled(db_url, "ana", True, user=TERMINAL)
    assert find_user(db_url, "ana") is None
    assert has_accounts(db_url)  # no way back to the open local mode by disabling everyone
    with pytest.raises(AccountError, match="role must be one of reviewer, admin"):
        add_account(db_url, "ben", "boss", "correct horse", user=TERMINAL)


def sign_in_form(at: AppTest, name: str, password: str) -> AppTest:
    at.text_input(key="signin_name").input(name)
    at.text_input(key="signin_password").input(password)
    at.button(key="signin_submit").click().run()
    assert not at.exception, at.exception
    return at


def test_the_sign_in_form_refuses_a_wrong_password_and_lets_the_right_one_in(workspace):
    add_account(workspace.db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert "Sign in" in [title.value for title in at.title]
    assert not at.sidebar.get("metric")  # no data before signing in
    sign_in_form(at, "ana", "wrong password")
    assert literal(f"{users.REFUSED}.") in page_text(at)
    assert at.text_input(key="signin_password").value == ""  # not kept in the session
    assert stored(workspace.db_url, "ana").failures == 1
    with session_scope(workspace.db_url) as session:  # past the one-second wait
        session.get(Account, "ana").locked_until = utcnow()
    sign_in_form(at, "ana", "correct horse")
    assert "Signed in as **ana** (reviewer)" in [c.value for c in at.sidebar.caption]
    assert at.title[0].value == "Dataset"
    assert [row.account for row in open_sign_ins(workspace.db_url)] == ["ana"]
    at.button(key="signout").click().run()
    assert "Sign in" in [title.value for title in at.title]
    assert open_sign_ins(workspace.db_url) == []  # ended for every tab, not just forgotten


def test_an_open_page_of_a_disabled_account_is_signed_out_at_its_next_rerun(workspace):
    add_account(workspace.db_url, "ana", "reviewer", "correct horse", user=TERMINAL)
    at = sign_in_form(
        AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run(), "ana", "correct horse"
    )
    assert at.title[0].value == "Dataset"
    set_disabled(workspace.db_url, "ana", True, user=TERMINAL)
    at.run()
    assert [title.value for title in at.title] == ["Sign in"]
    assert not at.sidebar.get("metric")


def test_the_local_admin_adds_the_first_account_in_the_browser_which_turns_sign_in_on(workspace):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("views/accounts.py").run()
    assert "No accounts yet" in page_text(at)
    assert at.radio(key="new_role").value == "admin"  # the first one: an admin
    at.text_input(key="new_name").input("Ana")
    at.text_input(key="new_password").input("short")
    at.button(key="add_account_submit").click().run()
    assert "Ana was not added: the password must have at least 8 characters." in page_text(at)
    at.text_input(key="new_name").input("Ana")
    at.text_input(key="new_password").input("correct horse")
    at.button(key="add_account_submit").click().run()
    assert not at.exception, at.exception
    assert "Added ana (admin)." in page_text(at)
    assert at.dataframe[0].value["account"].tolist() == ["ana"]
    assert sign_in(workspace.db_url, "ana", "correct horse") == User("ana", "admin")
    at.run()  # the app now has an account: it asks who is there
    assert [title.value for title in at.title] == ["Sign in"]
    sign_in_form(at, "ana", "correct horse")
    at.switch_page("views/accounts.py").run()
    assert at.selectbox(key="change_account").value == "ana"
    assert not [b for b in at.button if b.key == "disable_account"]  # not oneself


def test_an_admin_ends_a_sign_in_and_sets_the_limits_on_the_accounts_page(workspace):
    add_account(workspace.db_url, "ana", "admin", "correct horse", user=TERMINAL)
    add_account(workspace.db_url, "ben", "reviewer", "correct horse", user=TERMINAL)
    ben = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    sign_in_form(ben, "ben", "correct horse")
    at = sign_in_form(
        AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run(), "ana", "correct horse"
    )
    at.switch_page("views/accounts.py").run()
    assert "12 h without a visit, or 7 days at most" in page_text(at)
    listed = {row.account: row.token_hash for row in open_sign_ins(workspace.db_url)}
    assert sorted(label.split(" · ")[0] for label in at.multiselect(key="end_sign_ins").options) == [
        "ana",
        "ben",
    ]
    at.multiselect(key="end_sign_ins").set_value([listed["ben"]]).run()
    at.button(key="end_sign_ins_submit").click().run()
    assert not at.exception, at.exception
    assert "1 sign-in ended: each is signed out at its next click." in page_text(at)
    assert [label.split(" · ")[0] for label in at.multiselect(key="end_sign_ins").options] == ["ana"]
    ben.run()
    assert [title.value for title in ben.title] == ["Sign in"]
    at.number_input(key="idle_hours").set_value(2.0)
    at.number_input(key="absolute_days").set_value(1.0)
    at.button(key="set_limits").click().run()
    assert "New limits set" in page_text(at)
    assert "2 h without a visit, or 1 days at most" in page_text(at)
