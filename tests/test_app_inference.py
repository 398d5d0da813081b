"""The Inference page run headless with AppTest, with real inference jobs, and its queries."""

import re
import time
from pathlib import Path

import pytest
import torch
from conftest import open_page, page_text, write_image
from sqlalchemy import select, text

from db.predictions import confidence_histogram, grade_counts, models, pools, submission_frame
from db.schema import Image, Job, Prediction, Run, Source
from db.session import session_scope
from engine.data.preprocess import PreprocessConfig
from engine.data.sources import import_source
from engine.model.infer import register_model
from engine.model.networks import create_model, model_mean_std, save_checkpoint
from engine.runtime import jobs
from engine.runtime.markdown import literal
from engine.runtime.workspace import Workspace


def tiny_model(workspace: Workspace, name: str = "tiny") -> int:
    """A random `test_efficientnet` checkpoint, registered as a run; its id."""
    torch.manual_seed(0)
    model = create_model("test_efficientnet")
    with torch.no_grad():  # a random head is ~uniform: sharpen it so that confidences spread
        model.get_classifier().weight.mul_(300)
    mean, std = model_mean_std("test_efficientnet")
    meta = {
        "model_name": "test_efficientnet",
        "image_size": 64,
        "mean": list(mean),
        "std": list(std),
        "run": name,
        "preprocess": PreprocessConfig(size=64).to_dict(),
        "metrics": {"qwk": 0.5},
    }
    path = workspace.root / "weights" / f"{name}.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, meta)
    return register_model(workspace.db_url, path, meta)


def source_id(db_url: str, name: str) -> int:
    with session_scope(db_url) as session:
        return session.scalar(select(Source.id).where(Source.name == name))


def wait_for(db_url: str, job_id: int, statuses: tuple[str, ...], timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        jobs.mark_dead_jobs(db_url)
        with session_scope(db_url) as session:
            job = session.get(Job, job_id)
        finished = job.status not in jobs.ACTIVE
        if job.status in statuses or finished or time.monotonic() > deadline:
            assert job.status in statuses, (job.status, job.error, jobs.log_tail(job.log_path))
            return job
        time.sleep(0.2)


def infer_job(db_url: str) -> Job:
    with session_scope(db_url) as session:
        (job,) = session.scalars(select(Job).where(Job.kind == "infer")).all()
    return job


def test_empty_workspace_shows_sentences(workspace):
    at = open_page("inference")
    assert "No trained models yet: train one on the Retrain page" in page_text(at)
    assert "No image sources yet" in page_text(at)
    assert not at.button  # nothing to start


def test_inference_job_runs_and_the_results_show(workspace, tiny_data, monkeypatch):
    monkeypatch.setenv("DR_CPU_RUNTIME", "onnxruntime")  # the default outside the tests
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train", "demo APTOS train")
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "demo APTOS test")
    run_id = tiny_model(workspace)
    pool_id = source_id(workspace.db_url, "demo APTOS test")

    at = open_page("inference")
    assert at.selectbox(key="infer_model").value == run_id
    assert at.selectbox(key="infer_pool").value == pool_id  # the unlabelled pool, though newer
    assert "No predictions yet of tiny for demo APTOS test" in page_text(at)

    at.button(key="start_inference").click().run()
    assert not at.exception, at.exception
    job = infer_job(workspace.db_url)
    assert job.params["run_id"] == run_id and job.params["source"] == "demo APTOS test"
    assert len(at.main.get("progress")) == 1 and at.button(key="cancel_inference")

    job = wait_for(workspace.db_url, job.id, ("done",))
    assert job.run_id == run_id  # the predictions went under the chosen run
    log = Path(job.log_path).read_text()
    # The CPU's fast path, said with time and level; no progress bar in a job's log.
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO onnxruntime grades the images", log, re.M)
    assert "\r" not in log and "%|" not in log
    assert Path(job.params["out"]).is_file()
    at.run()
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 2 and len(at.get("download_button")) == 1
    assert "No predictions yet" not in page_text(at)

    counted = {}
    for value in (0.70, 0.5, 0.0):
        at.slider(key="infer_threshold").set_value(value).run()
        with session_scope(workspace.db_url) as session:
            expected = dict(
                session.execute(
                    text(
                        "SELECT p.grade, count(*) FROM predictions p JOIN images i ON i.id = p.image_id "
                        "WHERE p.run_id = :run AND i.source_id = :pool AND p.confidence >= :t "
                        "GROUP BY p.grade"
                    ),
                    {"run": run_id, "pool": pool_id, "t": value},
                ).all()
            )
        shown = [int(m.value) for m in at.main.metric]
        assert shown == [expected.get(g, 0) for g in range(4)], value
        counted[value] = sum(shown)
    assert 0 < counted[0.70] < 8 and counted[0.0] == 8  # the threshold really splits the pool


def test_second_start_is_refused_and_cancel_stops_the_job(workspace, tiny_data, tmp_path):
    for i in range(300):  # enough images at batch size 1 to outlast a click
        write_image(tmp_path / "big" / f"b{i:03}.png", (64, 48), value=60 + i % 100)
    import_source(workspace.db_url, "unlabelled", tmp_path / "big", "unlabelled", "big pool")
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "demo APTOS test")
    tiny_model(workspace)

    at = open_page("inference")
    assert at.selectbox(key="infer_pool").value == source_id(workspace.db_url, "big pool")
    at.number_input(key="infer_batch_size").set_value(1)
    at.button(key="start_inference").click().run()
    job = infer_job(workspace.db_url)
    assert job.params["batch_size"] == 1

    at.selectbox(key="infer_pool").select(source_id(workspace.db_url, "demo APTOS test"))
    at.button(key="start_inference").click().run()
    assert not at.exception, at.exception
    assert "Inference not started:" in page_text(at)
    assert literal(f"(#{job.id}) is already running") in page_text(at)
    assert infer_job(workspace.db_url).id == job.id  # still the only one

    wait_for(workspace.db_url, job.id, ("running",))  # its SIGTERM handler is in place
    at.button(key="cancel_inference").click().run()
    job = wait_for(workspace.db_url, job.id, ("cancelled",), timeout=30)
    assert job.progress < 1
    at.selectbox(key="infer_pool").select(source_id(workspace.db_url, "big pool")).run()
    assert f"infer job #{job.id} was cancelled" in page_text(at)


def test_a_failed_job_shows_its_error_and_log(workspace, tiny_data):
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "demo APTOS test")
    run_id = tiny_model(workspace)
    log = workspace.root / "logs" / "infer-1.log"
    log.parent.mkdir(parents=True)
    log.write_text("Traceback (most recent call last):\nRuntimeError: out of memory\n")
    with session_scope(workspace.db_url) as session:
        session.add(
            Job(
                kind="infer",
                status="failed",
                error="RuntimeError: out of memory",
                log_path=str(log),
                params={"run_id": run_id, "source_id": source_id(workspace.db_url, "demo APTOS test")},
            )
        )
    at = open_page("inference")
    assert f"infer job #1 failed: {literal('RuntimeError: out of memory')}" in page_text(at)
    assert "RuntimeError: out of memory" in at.code[0].value


@pytest.fixture
def predicted(db_url: str) -> tuple[str, int, int]:
    """Two runs' hand-made predictions on two pools; (db_url, run id, pool id) of one pair."""
    with session_scope(db_url) as session:
        pool, other = (
            Source(kind="unlabelled", root="/p", role="unlabelled", name="pool"),
            Source(kind="aptos", root="/t", role="train", name="train"),
        )
        run, older = (
            Run(name="new", model_name="m", img_size=64, checkpoint="/w/new.pth"),
            Run(name="old", model_name="m", img_size=64, checkpoint="/w/old.pth"),
        )
        draft = Run(name="draft", model_name="m", img_size=64)  # no checkpoint: not a model
        session.add_all([other, pool, older, run, draft])
        session.flush()
        for i, (grade, confidence) in enumerate([(0, 0.9), (0, 0.5), (2, 0.7), (3, 1.0), (1, 0.69)]):
            for source in (pool, other):
                image = Image(source_id=source.id, path=f"{i}.png", name=f"id{i}", width=8, height=8)
                session.add(image)
                session.flush()
                for model in (run, older):
                    probs = [(1 - confidence) / 3] * 4
                    probs[grade if model is run else (grade + 1) % 4] = confidence
                    session.add(
                        Prediction(
                            run_id=model.id,
                            image_id=image.id,
                            p0=probs[0],
                            p1=probs[1],
                            p2=probs[2],
                            p3=probs[3],
                            grade=probs.index(confidence),
                            confidence=confidence,
                        )
                    )
        return db_url, run.id, pool.id


def test_models_and_pools_lists(predicted):
    db_url, run_id, pool_id = predicted
    assert [m.name for m in models(db_url)] == ["new", "old"]
    assert models(db_url)[0].id == run_id and models(db_url)[0].checkpoint == "/w/new.pth"
    assert [(p.name, p.role, p.images) for p in pools(db_url)] == [
        ("pool", "unlabelled", 5),
        ("train", "train", 5),
    ]


def test_counts_and_histogram_of_one_model_on_one_pool(predicted):
    db_url, run_id, pool_id = predicted
    assert grade_counts(db_url, run_id, pool_id) == {0: 2, 1: 1, 2: 1, 3: 1}
    assert grade_counts(db_url, run_id, pool_id, 0.70) == {0: 1, 2: 1, 3: 1}  # >=, like Review
    assert grade_counts(db_url, run_id, pool_id + 5) == {}
    histogram = confidence_histogram(db_url, run_id, pool_id, bins=10)
    assert histogram["count"].sum() == 5
    rows = set(histogram.itertuples(index=False, name=None))
    assert rows == {(0, 0.5, 1), (1, 0.6, 1), (2, 0.7, 1), (0, 0.9, 1), (3, 0.9, 1)}


def test_submission_matches_the_predictions(predicted):
    db_url, run_id, pool_id = predicted
    frame = submission_frame(db_url, run_id, pool_id)
    assert list(frame.columns) == ["id_code", "diagnosis"]
    with session_scope(db_url) as session:
        expected = dict(
            session.execute(
                select(Image.name, Prediction.grade)
                .join(Prediction, Prediction.image_id == Image.id)
                .where(Prediction.run_id == run_id, Image.source_id == pool_id)
            ).all()
        )
    assert dict(zip(frame.id_code, frame.diagnosis, strict=True)) == expected
    assert list(frame.diagnosis) == [0, 0, 2, 3, 1]  # in import order
    assert frame.to_csv(index=False).splitlines()[:2] == ["id_code,diagnosis", "id0,0"]


def test_the_csv_says_referable_at_the_runs_operating_point(predicted):
    db_url, run_id, pool_id = predicted
    # P(grade >= 2) of the five images: 0.067, 0.333, 0.8, 1.0 and 0.207
    frame = submission_frame(db_url, run_id, pool_id, referable_at=0.3)
    assert list(frame.columns) == ["id_code", "diagnosis", "referable"]
    assert list(frame.referable) == ["no", "yes", "yes", "yes", "no"]
    assert list(submission_frame(db_url, run_id, pool_id, 0.9).referable) == ["no", "no", "no", "yes", "no"]


def test_the_page_counts_referable_images_and_warns_of_uncalibrated_views(workspace, tiny_data):
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    run_id = tiny_model(workspace)
    with session_scope(workspace.db_url) as session:
        run = session.get(Run, run_id)
        run.config = {**(run.config or {}), "tta": 8}
        run.calibration = {"temperature": 1.0, "screening": {"threshold": 0.25}}
    at = open_page("inference")
    assert not at.warning
    at.radio(key="infer_tta").set_value(2).run()
    assert [w.value for w in at.warning] == [
        "tiny was calibrated with 8 test-time views: with 2 its confidences, the review "
        "threshold and the operating point for referable DR are not calibrated."
    ]
    at.radio(key="infer_tta").set_value(None).run()
    at.button(key="start_inference").click().run()
    wait_for(workspace.db_url, infer_job(workspace.db_url).id, ("done",))
    at.run()
    expected = (
        submission_frame(workspace.db_url, run_id, source_id(workspace.db_url, "pool"), 0.25).referable
        == "yes"
    ).sum()
    (metric,) = [m for m in at.metric if m.label == "Referable DR (grade ≥ 2)"]
    assert metric.value == f"{expected} of 8"


def test_names_show_as_written_and_the_submission_stays_in_the_workspace(workspace, tiny_data):
    pool = "../../../../escaped/**pool** $x$"  # a source's name is free text
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", pool)
    tiny_model(workspace, "tiny_run_")
    at = open_page("inference")
    assert f"No predictions yet of {literal('tiny_run_')} for {literal(pool)}" in page_text(at)
    assert at.caption[0].value.startswith(f"Model **{literal('tiny_run_')}** · ")

    at.button(key="start_inference").click().run()
    job = wait_for(workspace.db_url, infer_job(workspace.db_url).id, ("done",))
    out = Path(job.params["out"])
    assert out.parent == workspace.root / "submissions" and out.is_file()
    assert [p.name for p in workspace.root.parent.iterdir()] == ["ws"]  # nothing beside it
