"""Sign-in in a real browser: Debian's chromium against `streamlit run app.py` with one local
account made by the command line; a wrong password is refused in words, the right one lets the
reviewer in, who sees no admin control on the Retrain page. The sign-in outlasts a reload and
holds in a new tab; signing out in one tab signs the other out at its next click, and so does
disabling the account."""

import os
import subprocess
import sys
from pathlib import Path

from browser import chromium_page, go_to, require_chromium, screenshot, streamlit_server, wait_until_idle
from conftest import ROOT

from db.session import migrate
from engine.data.sources import import_source
from engine.runtime.workspace import Workspace

PASSWORD = "correct horse"


def users_cli(workspace: Workspace, *args: str) -> None:
    """`python -m db.users ...`, a password piped in as a script does."""
    subprocess.run(
        [sys.executable, "-m", "db.users", *args],
        cwd=ROOT,
        input=f"{PASSWORD}\n",
        text=True,
        check=True,
        env={**os.environ, "DR_WORKSPACE": str(workspace.root)},
    )


def sign_in(page, name: str, password: str) -> None:
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    wait_until_idle(page)


def test_a_reviewer_signs_in_with_a_password(tmp_path: Path, tiny_data: Path):
    require_chromium()
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train", "train")
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation", "validation")
    users_cli(workspace, "add", "ana", "--role", "reviewer")

    with streamlit_server(workspace.root, tmp_path / "server.log") as url, chromium_page() as page:
        page.goto(f"{url}/retrain")  # a bookmark: the sign-in comes first
        page.get_by_role("heading", name="Sign in", level=1).wait_for()
        wait_until_idle(page)
        sidebar = page.locator("[data-testid='stSidebar']")
        assert not sidebar.get_by_text("Candidates").is_visible()  # no data before it
        screenshot(page, "signin-form")

        sign_in(page, "ana", "wrong password")
        page.get_by_text("Wrong name or password, or the account may not sign in now").wait_for()
        page.wait_for_timeout(1200)  # the wait after one failure is 1 s

        sign_in(page, "ana", PASSWORD)
        page.get_by_role("heading", name="Retrain", level=1).wait_for()
        wait_until_idle(page)
        assert sidebar.get_by_text("Signed in as").is_visible()
        assert page.get_by_text("An admin starts training runs").is_visible()
        assert page.get_by_role("button", name="Start training").count() == 0
        screenshot(page, "signin-reviewer")

        go_to(page, "Review")
        page.get_by_text("every decision is stored with this account").wait_for()
        cookie = next(c for c in page.context.cookies() if c["name"] == "dr_sign_in")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie").find("dr_sign_in") == -1  # no script reads it

        page.reload()  # F5: the same page, still signed in
        page.get_by_role("heading", name="Review", level=1).wait_for()
        wait_until_idle(page)
        assert sidebar.get_by_text("Signed in as").is_visible()

        other = page.context.new_page()  # a second tab of the same browser
        other.goto(f"{url}/retrain")
        other.get_by_role("heading", name="Retrain", level=1).wait_for()
        wait_until_idle(other)

        sidebar.get_by_role("button", name="Sign out").click()
        page.get_by_role("heading", name="Sign in", level=1).wait_for()
        wait_until_idle(page)
        other.locator("[data-testid='stSidebar']").get_by_role("link", name="Review").click()
        other.get_by_role("heading", name="Sign in", level=1).wait_for()  # at its next click
        page.reload()
        page.get_by_role("heading", name="Sign in", level=1).wait_for()  # the cookie is gone

        sign_in(page, "ana", PASSWORD)
        page.get_by_role("heading", name="Review", level=1).wait_for()
        wait_until_idle(page)
        users_cli(workspace, "disable", "ana")
        sidebar.get_by_role("link", name="Dataset").click()  # the open tab's next click
        page.get_by_role("heading", name="Sign in", level=1).wait_for()
