"""Roles and the audit trail: what a reviewer may not do (the pages show no control for it, the
engine refuses it), every decision, job and promotion naming its account, the refusal to
serve data to other machines without accounts, institutional sign-in, and where exports may
write."""

import re

import pytest
from argon2 import PasswordHasher
from conftest import BOTH_BACKENDS, ROOT, page_text, write_image
from sqlalchemy import select
from streamlit import config
from streamlit.testing.v1 import AppTest
from test_agreement import read_by_hand
from test_db_copy import rows
from test_review import predicted  # noqa: F401 (a fixture)
from test_upload import aptos_zip
from test_users import sign_in_form

from db import users
from db.reviews import adjudicate, adjudication_queue, set_double_read_share
from db.runs import promote, promotions
from db.schema import Account, Job, Review, Run
from db.session import session_scope
from db.users import LOCAL, TERMINAL, NotAllowed, User, add_account, set_disabled, set_password
from engine.data.export import ExportRefused, export_class_folders, export_roots
from engine.data.upload import unpack_zip
from engine.loop.import_model import import_upload
from engine.runtime import jobs
from engine.runtime.markdown import literal
from views.signin import served_locally

PASSWORD = "correct horse"
BEN = User("ben", "reviewer")
# The controls only an admin gets, page by page.
ADMIN_ONLY = {
    "dataset": ["import_kind"],
    "retrain": ["start_training", "promote", "export_onnx", "export_safetensors"],
    "inference": ["start_inference"],
    "review": ["export_folders", "double_read"],
    "agreement": ["adjudicate_1"],
}


@pytest.fixture(autouse=True)
def quick_hashes(monkeypatch):
    monkeypatch.setattr(users, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def team(predicted):  # noqa: F811
    """The workspace of test_review with an admin, ana, and a reviewer, ben."""
    workspace, run_id, pool = predicted
    add_account(workspace.db_url, "ana", "admin", PASSWORD, user=TERMINAL)
    add_account(workspace.db_url, "ben", "reviewer", PASSWORD, user=TERMINAL)
    read_by_hand(workspace.db_url, run_id, pool)  # reads for the adjudication to wait
    return predicted


def signed_in(name: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    return sign_in_form(at, name, PASSWORD)


def controls(at: AppTest) -> set[str]:
    return {widget.key for kind in ("button", "slider", "selectbox") for widget in at.main.get(kind)}


def test_a_reviewer_gets_no_admin_control_and_reviews_under_the_account(team):
    workspace, run_id, pool = team
    admin, reviewer = signed_in("ana"), signed_in("ben")
    for page, keys in ADMIN_ONLY.items():
        for at in (admin, reviewer):
            at.switch_page(f"views/{page}.py").run()
            assert not at.exception, at.exception
        assert set(keys) <= controls(admin), page
        assert not set(keys) & controls(reviewer), page
    assert "An admin starts training runs" in page_text(reviewer.switch_page("views/retrain.py").run())
    assert admin.switch_page("views/accounts.py").run().title[0].value == "Accounts"
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        reviewer.switch_page("views/accounts.py")  # no such page for a reviewer
    reviewer.switch_page("views/review.py").run()
    assert "Reviewing as ben" in page_text(reviewer).replace("**", "")
    assert not reviewer.get("download_button")  # the curated labels are an admin's export
    reviewer.button(key=f"accept_{reviewer.session_state.current}").click().run()
    with session_scope(workspace.db_url) as session:
        last = session.scalars(select(Review).order_by(Review.id.desc())).first()
    assert (last.reviewer, last.decision) == ("ben", "accept")


def stale_admin(db_url: str, how: str) -> User:
    """ana as her browser session still holds her, an admin, once her account was `how`
    (demoted to a reviewer, or disabled) since that session's last run."""
    with session_scope(db_url) as session:
        account = session.get(Account, "ana")
        if how == "demoted":
            account.role = "reviewer"
        else:
            account.disabled = True
    return User("ana", "admin")


def queued_job(db_url: str) -> int:
    with session_scope(db_url) as session:
        job = Job(kind="import", status="queued")
        session.add(job)
        session.flush()
        return job.id


STANDING = {
    "reviewer": "ben is a reviewer",
    "demoted": "ana is a reviewer",
    "disabled": "ana is no longer an enabled account",
}


@BOTH_BACKENDS
@pytest.mark.parametrize("who", list(STANDING))
def test_db_and_engine_refuse_admin_actions_to_anyone_not_an_admin_now(team, who, tmp_path):
    """A reviewer, and an admin demoted or disabled since her session last ran, whose User
    object still says admin: the accounts are read again at each action."""
    workspace, run_id, pool = team
    db = workspace.db_url
    user = BEN if who == "reviewer" else stale_admin(db, who)
    job_id, conflict = queued_job(db), adjudication_queue(db)[0]
    actions = {
        "adjudicate": lambda: adjudicate(db, user, conflict, 1),
        "set the double-read share": lambda: set_double_read_share(db, 0.5, user=user),
        "cancel a job": lambda: jobs.cancel_job(db, job_id, user=user),
        "start a train job": lambda: jobs.start_job(workspace, "train", "engine.training.train", user=user),
        "promote a model": lambda: promote(db, run_id, user),
        "import a model": lambda: import_upload(workspace, user, "best.pth", b"", "seed"),
        "export labels": lambda: export_class_folders(
            [], workspace.root / "export", db_url=db, user=user, roots=export_roots(workspace.root)
        ),
        "upload a dataset": lambda: unpack_zip(
            aptos_zip(tmp_path), "aptos.zip", tmp_path / "uploads", db_url=db, user=user
        ),
        "add accounts": lambda: add_account(db, "cleo", "admin", None, user=user),
        "set passwords": lambda: set_password(db, "ana", "another horse", user=user),
        "disable or enable accounts": lambda: set_disabled(db, "ben", True, user=user),
    }
    before = rows(db)
    for action, act in actions.items():
        with pytest.raises(NotAllowed, match=re.escape(f"{STANDING[who]}: only an admin may {action}")):
            act()
    assert rows(db) == before  # nothing recorded, nothing started
    written = [workspace.root / "export", workspace.root / "uploads", tmp_path / "uploads"]
    assert not any(path.exists() for path in written)


@BOTH_BACKENDS
def test_the_local_admin_acts_until_the_first_account_and_the_terminal_always(workspace):
    db = workspace.db_url
    set_double_read_share(db, 0.2, user=LOCAL)
    add_account(db, "ana", "admin", None, user=LOCAL)  # as the Accounts page adds the first
    with pytest.raises(NotAllowed, match="local is no longer an enabled account"):
        set_double_read_share(db, 0.3, user=LOCAL)
    set_disabled(db, "ana", True, user=TERMINAL)  # python -m db.users disable ana
    set_double_read_share(db, 0.4, user=TERMINAL)


def cancel_tick(job_id: int) -> None:
    """One tick of a fragment that draws a job's Cancel, in a browser session whose last full
    run signed ana in as an admin: a tick runs no sign-in, the user it finds is that run's."""
    from types import SimpleNamespace

    import streamlit as st

    from db.users import User
    from views.common import cancel_ui

    st.session_state.user = User("ana", "admin")
    cancel_ui(SimpleNamespace(id=job_id), "Cancel", "cancel")


@BOTH_BACKENDS
@pytest.mark.parametrize("how", ["demoted", "disabled"])
def test_an_admin_demoted_or_disabled_loses_cancel_within_one_tick(team, how):
    workspace, run_id, pool = team
    job_id = queued_job(workspace.db_url)
    tick = AppTest.from_function(cancel_tick, args=(job_id,), default_timeout=60).run()
    assert not tick.exception, tick.exception
    assert [button.key for button in tick.button] == ["cancel"]
    stale_admin(workspace.db_url, how)
    tick.button(key="cancel").click().run()  # drawn before, clicked after
    assert not tick.exception and not tick.button
    assert jobs.latest_job(workspace.db_url, "import").status == "queued"  # not cancelled


def test_a_reviewer_sees_how_many_conflicts_wait_and_no_read(team):
    admin, reviewer = signed_in("ana"), signed_in("ben")
    for at in (admin, reviewer):
        at.switch_page("views/agreement.py").run()
        assert not at.exception, at.exception
        assert "2 image(s) with conflicting reads wait" in page_text(at)
    assert "**ben** corrected to grade 2" in page_text(admin)
    assert "corrected to grade" not in page_text(reviewer)
    assert "accepted grade" not in page_text(reviewer)
    assert not reviewer.main.get("imgs")  # not even the photograph


def test_an_admin_demoted_meanwhile_is_refused_adjudicating_in_words(team):
    workspace, run_id, pool = team
    at = signed_in("ana").switch_page("views/agreement.py").run()
    stale_admin(workspace.db_url, "demoted")
    at.button(key="adjudicate_1").click().run()
    assert not at.exception, at.exception
    assert literal("ana is a reviewer: only an admin may adjudicate.") in page_text(at)
    assert len(adjudication_queue(workspace.db_url)) == 2
    assert "adjudicate_1" not in controls(at)  # the page drew itself for a reviewer


@BOTH_BACKENDS
def test_jobs_runs_and_promotions_name_their_account(workspace):
    with session_scope(workspace.db_url) as session:
        run = Run(name="r", model_name="m", img_size=64, status="done", checkpoint="c")
        session.add(run)
        session.flush()
        run_id = run.id
    promote(workspace.db_url, run_id, LOCAL)  # before the first account: the local admin
    admin = add_account(workspace.db_url, "ana", "admin", None, user=TERMINAL)
    job_id = jobs.start_job(workspace, "demo", "engine.loop.demo", ["--help"], user=admin)
    jobs._children[(workspace.db_url, job_id)].wait(timeout=60)
    with session_scope(workspace.db_url) as session:
        assert session.get(Job, job_id).account == "ana"
        session.get(Job, job_id).kind = "train"  # as a training job's process would be
    jobs.JobReporter(workspace.db_url, job_id).attach_run(run_id)
    promote(workspace.db_url, run_id, admin)
    with session_scope(workspace.db_url) as session:
        assert session.get(Run, run_id).account == "ana"
    assert [(name, account) for name, account, _ in promotions(workspace.db_url)] == [
        ("r", "local"),
        ("r", "ana"),
    ]


@pytest.mark.parametrize(
    "address, headers, local",
    [
        ("localhost", {"Host": "localhost:8501"}, True),
        ("127.0.0.1", {"Host": "127.0.0.1:8501"}, True),
        ("::1", {"Host": "[::1]:8501"}, True),
        ("localhost", {}, True),
        (None, {"Host": "localhost:8501"}, False),  # unset: Streamlit listens on every interface
        ("0.0.0.0", {"Host": "localhost:8501"}, False),
        ("localhost", {"Host": "dr.clinic.org"}, False),  # a proxy that passes the name on
        ("localhost", {"Host": "127.0.0.1:8501", "X-Forwarded-For": "10.0.0.7"}, False),
    ],
)
def test_served_locally(address, headers, local):
    assert served_locally(address, headers) is local


@pytest.fixture
def on_the_network():
    """The server as `--server.address 0.0.0.0` starts it."""
    before = config.get_option("server.address")
    config.set_option("server.address", "0.0.0.0")
    yield
    config.set_option("server.address", before)


def test_served_to_other_machines_without_accounts_it_shows_no_data(workspace, on_the_network):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    assert [title.value for title in at.title] == ["Sign-in needed"]
    assert "reachable from other machines" in page_text(at)
    assert "python -m db.users add NAME --role admin" in page_text(at)
    assert not at.sidebar.get("metric") and not at.main.get("button")
    add_account(workspace.db_url, "ana", "admin", PASSWORD, user=TERMINAL)
    at.run()
    assert [title.value for title in at.title] == ["Sign in"]
    sign_in_form(at, "ana", PASSWORD)
    assert at.title[0].value == "Dataset"


def test_institutional_sign_in_takes_roles_from_the_accounts(workspace):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.secrets["auth"] = {
        "redirect_uri": "http://localhost:8501/oauth2callback",
        "cookie_secret": "s" * 32,
        "client_id": "dr",
        "client_secret": "x",
        "server_metadata_url": "https://idp/.wk",
    }
    at.user = {"is_logged_in": False}
    at.run()
    assert at.button(key="signin_provider").label == "Sign in with your institution"
    assert not at.sidebar.get("metric")
    at.user = {"is_logged_in": True, "email": "Cleo@Clinic.org", "email_verified": True}
    at.run()
    assert "python -m db.users add Cleo@Clinic.org --role reviewer --sso" in page_text(at)
    assert "signed in as Cleo\\@Clinic\\.org," in page_text(at)  # as written, not markdown
    assert not at.sidebar.get("metric")
    add_account(workspace.db_url, "cleo@clinic.org", "reviewer", None, user=TERMINAL)
    at.run()
    assert not at.exception, at.exception
    assert "Signed in as **cleo\\@clinic\\.org** (reviewer)" in [c.value for c in at.sidebar.caption]
    at.user = {"is_logged_in": True, "email": "cleo@clinic.org", "email_verified": False}
    at.run()  # an e-mail the provider did not verify signs in as no one
    assert not at.sidebar.get("metric")


def test_exports_write_only_under_the_workspace_or_named_roots(workspace, tmp_path, monkeypatch):
    image = write_image(tmp_path / "src" / "a.png")
    files = [(str(image), 1)]
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(
        ExportRefused, match=f"{elsewhere} is outside the folders exports may write to \\({workspace.root}\\)"
    ):
        export_class_folders(
            files, elsewhere, db_url=workspace.db_url, user=LOCAL, roots=export_roots(workspace.root)
        )
    link = workspace.root / "out"
    link.symlink_to(elsewhere, target_is_directory=True)  # inside by name, outside in fact
    with pytest.raises(ExportRefused, match="is outside the folders"):
        export_class_folders(
            files, link, db_url=workspace.db_url, user=LOCAL, roots=export_roots(workspace.root)
        )
    assert not elsewhere.exists()
    export_class_folders(
        files,
        workspace.root / "export",
        db_url=workspace.db_url,
        user=LOCAL,
        roots=export_roots(workspace.root),
    )
    assert (workspace.root / "export" / "1" / "a.png").is_file()
    monkeypatch.setenv("DR_EXPORT_ROOTS", str(tmp_path / "shared"))
    export_class_folders(
        files,
        tmp_path / "shared" / "x",
        db_url=workspace.db_url,
        user=LOCAL,
        roots=export_roots(workspace.root),
    )
    assert (tmp_path / "shared" / "x" / "1" / "a.png").is_file()


def test_the_review_page_refuses_an_export_outside_in_words(predicted, tmp_path):  # noqa: F811
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    at.switch_page("views/review.py").run()
    at.text_input(key="export_folder").input(str(tmp_path / "elsewhere")).run()
    at.button(key="export_folders").click().run()
    assert not at.exception, at.exception
    assert literal(f"{tmp_path / 'elsewhere'} is outside the folders exports may write to") in page_text(at)
    assert not (tmp_path / "elsewhere").exists()


def test_an_empty_workspace_tells_a_reviewer_what_an_admin_does_next(workspace):
    add_account(workspace.db_url, "ben", "reviewer", PASSWORD, user=TERMINAL)
    reviewer = signed_in("ben")
    for page, waits_for in (
        ("review", "once an admin has trained a model"),
        ("inference", "an admin trains one"),
        ("retrain", "an admin imports a labelled training source"),
    ):
        text = page_text(reviewer.switch_page(f"views/{page}.py").run())
        assert waits_for in text, page
        # no step that needs a control a reviewer does not have
        assert "Retrain page" not in text and "Dataset page" not in text, page
