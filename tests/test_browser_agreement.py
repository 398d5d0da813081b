"""Agreement in a real browser: two reviewers' blind reads of the same images give kappa and a
reviewer x reviewer confusion matrix, and an admin settles a conflict with one click that the
database keeps as an appended adjudication."""

from pathlib import Path

from browser import chromium_page, require_chromium, screenshot, streamlit_server, wait_for, wait_until_idle
from sqlalchemy import select
from test_agreement import read_by_hand
from test_review import POOL, add_predictions, image_ids, register_run

from db.reviews import adjudication_queue
from db.schema import Review
from db.session import migrate, read_scope
from engine.data.sources import import_source
from engine.runtime.workspace import Workspace
from grades import GRADE_NAMES


def adjudications(db_url: str) -> list[tuple]:
    with read_scope(db_url) as session:
        return [
            tuple(row)
            for row in session.execute(
                select(Review.image_id, Review.grade, Review.reviewer)
                .where(Review.decision == "adjudicate")
                .order_by(Review.id)
            )
        ]


def test_agreement_figures_and_an_adjudication_by_click(tmp_path: Path, tiny_data: Path):
    require_chromium()
    workspace = Workspace(tmp_path / "ws")
    db = workspace.db_url
    migrate(db)
    import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    run_id = register_run(workspace)
    pool = image_ids(db, "pool")
    add_predictions(db, run_id, pool, POOL)
    read_by_hand(db, run_id, pool)  # four images read twice, two of them in conflict
    conflicts = adjudication_queue(db)
    assert len(conflicts) == 2

    with streamlit_server(workspace.root, tmp_path / "server.log") as url, chromium_page() as page:
        page.goto(f"{url}/agreement")
        page.get_by_role("heading", name="Agreement", level=1).wait_for()
        wait_until_idle(page)
        main = page.locator("[data-testid='stMain']")
        metrics = main.locator("[data-testid='stMetric']")
        assert metrics.filter(has_text="Images read twice").inner_text().split()[-1] == "4"
        assert metrics.filter(has_text="Exact agreement").inner_text().split()[-1] == "50%"
        main.locator(".js-plotly-plot").filter(has_text="second read").wait_for()
        main.get_by_text("2 image(s) with conflicting reads wait.").wait_for()
        main.get_by_role("heading", name=conflicts[0].name).wait_for()
        screenshot(page, "agreement")

        main.get_by_role("button", name=GRADE_NAMES[2]).click()
        wait_for(lambda: adjudications(db), 30, "the adjudication row")
        assert adjudications(db) == [(conflicts[0].image_id, 2, "local")]
        main.get_by_text("1 image(s) with conflicting reads wait.").wait_for()
        main.get_by_role("heading", name=conflicts[1].name).wait_for()
        screenshot(page, "agreement-adjudicated")
