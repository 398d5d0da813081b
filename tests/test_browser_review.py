"""Review in a real browser: Debian's chromium against `streamlit run app.py`; a reviewer
shows the evidence with `g`, decides three candidates with the keyboard only, undoes the last
one, and the database holds one appended row per key."""

from pathlib import Path

from sqlalchemy import select

from browser import (chromium_page, press_on_body, require_chromium, screenshot,
                     streamlit_server, wait_for, wait_for_shortcuts, wait_until_idle)
from db.schema import Image, Review
from db.session import migrate, session_scope
from engine.sources import import_source
from engine.workspace import Workspace
from test_review import POOL, add_predictions, image_ids, register_run

KEYS = ("accept", "reject", "grade_2", "undo", "keys_help", "evidence")


def reviews(db_url: str) -> list[tuple]:
    with session_scope(db_url) as session:
        return [tuple(row) for row in session.execute(
            select(Review.image_id, Review.decision, Review.grade, Review.reviewer)
            .order_by(Review.id))]


def image_name(db_url: str, image_id: int) -> str:
    with session_scope(db_url) as session:
        return session.get(Image, image_id).name


def on_screen(page) -> str:
    """The name of the candidate on screen (the card's subheader)."""
    return page.locator("[data-testid='stMain'] h3").first.inner_text().strip()


def keys_ready(page) -> None:
    """Until the shortcuts know the page's buttons and the page's key guard is in place."""
    wait_for_shortcuts(page, *KEYS)
    page.wait_for_function("() => !!window.__reviewKeys")


def decide_by_key(page, db_url: str, key: str, rows: int) -> None:
    """Press `key`, then wait for the database's `rows`-th review and the page's next image."""
    before = on_screen(page)
    press_on_body(page, key)
    wait_for(lambda: len(reviews(db_url)) >= rows, 30, f"review row {rows} after {key!r}")
    wait_until_idle(page)
    wait_for(lambda: on_screen(page) != before, 30, f"the next image after {key!r}")
    keys_ready(page)


def test_keyboard_decisions_and_undo_reach_the_database(tmp_path: Path, tiny_data: Path):
    require_chromium()
    workspace = Workspace(tmp_path / "ws")
    db = workspace.db_url
    migrate(db)
    import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    import_source(db, "folders", tiny_data / "validation", "validation", "validation")
    run_id = register_run(workspace)
    pool = image_ids(db, "pool")
    add_predictions(db, run_id, pool, POOL)  # six candidates at 0.70, least confident first

    with streamlit_server(workspace.root, tmp_path / "server.log") as url, \
            chromium_page() as page:
        page.goto(f"{url}/review")  # a bookmark, on a fresh server: app.py still runs
        page.get_by_role("heading", name="Review", level=1).wait_for()
        wait_until_idle(page)
        sidebar = page.locator("[data-testid='stSidebar']")
        assert sidebar.get_by_role("link", name="Dataset").is_visible()
        assert sidebar.get_by_text("Candidates").is_visible()  # the loop overview
        page.get_by_text("Reviewing as").wait_for()  # the one local user: no accounts
        wait_until_idle(page)
        keys_ready(page)
        assert page.get_by_text("0 of 6 candidates reviewed").is_visible()
        assert on_screen(page) == image_name(db, pool[5])
        screenshot(page, "review-before")

        press_on_body(page, "?")
        page.get_by_text("undo your last decision").wait_for()
        wait_until_idle(page)
        keys_ready(page)
        assert reviews(db) == []  # the help key decides nothing

        press_on_body(page, "g")  # the evidence: Grad-CAM beside the image, the flip views
        page.get_by_text("Grad-CAM of grade 1").wait_for()
        page.locator(".js-plotly-plot").filter(has_text="Test-time views").wait_for()
        wait_until_idle(page)
        keys_ready(page)
        screenshot(page, "review-evidence")
        assert reviews(db) == []

        press_on_body(page, "g")  # and hidden again
        page.get_by_text("Grad-CAM of grade 1").wait_for(state="detached")
        wait_until_idle(page)
        keys_ready(page)

        decide_by_key(page, db, "a", 1)
        decide_by_key(page, db, "x", 2)
        decide_by_key(page, db, "2", 3)
        # Predicted grades of pool 5, 4, 3 are 1, 0, 3 (POOL).
        assert reviews(db) == [(pool[5], "accept", 1, "local"),
                               (pool[4], "reject", None, "local"),
                               (pool[3], "relabel", 2, "local")]
        page.get_by_text("3 of 6 candidates reviewed").wait_for()
        screenshot(page, "review-after")

        decide_by_key(page, db, "Backspace", 4)
        assert reviews(db)[3] == (pool[3], "undo", None, "local")
        assert on_screen(page) == image_name(db, pool[3])  # back on screen to decide again
        page.get_by_text("2 of 6 candidates reviewed").wait_for()
        screenshot(page, "review-undone")

        folder = page.get_by_label("Class folders 0-3 into")
        typed = folder.input_value() + "x2"
        folder.press("End")
        page.keyboard.type("x2")  # typed into a field: no shortcut
        page.wait_for_timeout(1000)
        assert folder.input_value() == typed
    assert len(reviews(db)) == 4

