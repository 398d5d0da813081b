"""The whole loop in a real browser (Debian's chromium against `streamlit run app.py`) on a
tiny workspace: inference from the Inference page, two candidates accepted with the keyboard,
a two-epoch retrain of the tiny model from the Retrain page, its curves, its promotion. The
database is checked after each step."""

from pathlib import Path

from browser import (
    chromium_page,
    go_to,
    require_chromium,
    screenshot,
    streamlit_server,
    wait_for,
    wait_for_count,
    wait_until_idle,
)
from sqlalchemy import func, select
from test_app_inference import tiny_model
from test_browser_review import decide_by_key, reviews, wait_viewer

from db.runs import active_run_id, epochs_frame
from db.schema import Epoch, Image, Job, Prediction, Run, Source
from db.session import migrate, session_scope
from engine.data.sources import import_source
from engine.runtime import jobs
from engine.runtime.workspace import Workspace
from grades import REVIEW_THRESHOLD
from views.curves import curve_figures

RUN = "browser-run"


def pool_predictions(db_url: str, run_id: int) -> list[tuple[int, int, float]]:
    """(image id, grade, confidence) of the run's predictions on the pool."""
    with session_scope(db_url) as session:
        return [
            tuple(row)
            for row in session.execute(
                select(Prediction.image_id, Prediction.grade, Prediction.confidence)
                .join(Image)
                .join(Source)
                .where(Prediction.run_id == run_id, Source.name == "pool")
                .order_by(Prediction.image_id)
            )
        ]


def finished(db_url: str, kind: str) -> Job | None:
    """The newest job of `kind` once it has ended; a failure fails the test with its log."""
    jobs.mark_dead_jobs(db_url)
    job = jobs.latest_job(db_url, kind)
    if job is None or job.status in jobs.ACTIVE:
        return None
    assert job.status == "done", (job.status, job.error, jobs.log_tail(job.log_path))
    return job


def new_run(db_url: str) -> Run | None:
    with session_scope(db_url) as session:
        return session.scalar(select(Run).where(Run.name == RUN))


def epochs(db_url: str, run_id: int) -> int:
    with session_scope(db_url) as session:
        return session.scalar(select(func.count()).select_from(Epoch).where(Epoch.run_id == run_id))


def promoted(db_url: str) -> list[int]:
    with session_scope(db_url) as session:
        return list(session.scalars(select(Run.id).where(Run.active)))


def chosen(page, key: str) -> str:
    """What a selectbox shows: its combobox's text."""
    return page.locator(f".st-key-{key} input").input_value()


def charts(page, count: int) -> None:
    """Until the page's main area shows `count` charts."""
    wait_for_count(page.locator("[data-testid='stMain'] [data-testid='stPlotlyChart']"), count, "charts")


def infer_ui(page, db_url: str, run_id: int) -> list[tuple[int, int, float]]:
    go_to(page, "Inference")
    assert chosen(page, "infer_model").startswith("tiny")
    assert chosen(page, "infer_pool") == "pool (unlabelled, 8 images)"
    page.get_by_role("button", name="Start inference").click()
    job = wait_for(lambda: finished(db_url, "infer"), 120, "the inference job")
    assert job.params["run_id"] == run_id and job.params["source"] == "pool"
    predictions = pool_predictions(db_url, run_id)
    assert len(predictions) == 8  # every pool image
    page.get_by_text("Review candidates").wait_for()  # the page reran when the job ended
    wait_until_idle(page)
    charts(page, 2)  # confidence histogram, predicted grades
    candidates = sum(confidence >= REVIEW_THRESHOLD for *_, confidence in predictions)
    assert page.get_by_text(f"{candidates} predictions at or above 0.70").is_visible()
    screenshot(page, "loop-1-inference")
    return predictions


def review_ui(page, db_url: str, predictions: list[tuple[int, int, float]]) -> None:
    go_to(page, "Review")
    page.get_by_text("Reviewing as").wait_for()  # the one local user: no accounts
    wait_until_idle(page)
    wait_viewer(page, loaded="1")
    decide_by_key(page, db_url, "a", 1)
    decide_by_key(page, db_url, "a", 2)
    predicted = {
        image_id: grade for image_id, grade, confidence in predictions if confidence >= REVIEW_THRESHOLD
    }
    page.get_by_text(f"2 of {len(predicted)} candidates reviewed").wait_for()
    rows = reviews(db_url)
    assert [(decision, reviewer) for _, decision, _, reviewer in rows] == [("accept", "local")] * 2
    assert len({image_id for image_id, *_ in rows}) == 2
    assert all(grade == predicted[image_id] for image_id, _, grade, _ in rows)
    screenshot(page, "loop-2-review")


def retrain_ui(page, db_url: str) -> Run:
    go_to(page, "Retrain")
    page.get_by_label("Run name").fill(RUN)
    page.locator(".st-key-train_model input").click()
    page.keyboard.type("test_efficientnet")  # not in the list: the box takes a typed name
    page.keyboard.press("Enter")
    assert chosen(page, "train_model") == "test_efficientnet"
    page.get_by_label("Image size").fill("64")
    page.get_by_label("Epochs").fill("2")
    page.locator(".st-key-train_pretrained label").click()  # off: nothing to download
    assert not page.locator(".st-key-train_pretrained input").is_checked()
    screenshot(page, "loop-3-retrain-form")
    page.get_by_role("button", name="Start training").click()

    job = wait_for(lambda: finished(db_url, "train"), 180, "the training job")
    run = new_run(db_url)
    assert job.run_id == run.id and run.status == "done" and run.checkpoint
    assert run.model_name == "test_efficientnet" and run.img_size == 64
    assert epochs(db_url, run.id) == 2
    assert run.config["train_counts"] and sum(run.config["train_counts"]) == 24 + 2
    page.get_by_text(f"{RUN}, best epoch").wait_for()  # the page reran when the job ended
    wait_until_idle(page)
    curves = len(curve_figures(epochs_frame(db_url, [run.id])))
    # The curated set, the curves, per class, confusion, the reliability diagram and the ROC
    # curve with the operating point.
    charts(page, 1 + curves + 4)
    screenshot(page, "loop-4-retrained")
    return run


def promote_ui(page, db_url: str, run: Run) -> None:
    assert run.id not in promoted(db_url)  # a finished retrain waits for a Promote
    assert chosen(page, "promote_run") == RUN  # the picker follows the finished run
    page.get_by_role("button", name="Promote").click()
    # The run made for inference was active before: wait for this one, not for any.
    wait_for(lambda: promoted(db_url) == [run.id], 30, "the promotion")
    wait_until_idle(page)
    assert active_run_id(db_url) == run.id
    page.get_by_text(f"Active model: {RUN}").wait_for()
    screenshot(page, "loop-5-promoted")


def test_predict_review_retrain_promote(tmp_path: Path, tiny_data: Path):
    require_chromium()
    workspace = Workspace(tmp_path / "ws")
    db = workspace.db_url
    migrate(db)
    import_source(db, "aptos", tiny_data / "aptos", "train", "train")
    import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    import_source(db, "folders", tiny_data / "validation", "validation", "validation")
    run_id = tiny_model(workspace)  # a sharpened head: some predictions reach 0.70

    with streamlit_server(workspace.root, tmp_path / "server.log") as url, chromium_page() as page:
        page.goto(url)
        wait_until_idle(page)
        predictions = infer_ui(page, db, run_id)
        assert sum(c >= REVIEW_THRESHOLD for *_, c in predictions) >= 2, predictions
        review_ui(page, db, predictions)
        run = retrain_ui(page, db)
        promote_ui(page, db, run)
