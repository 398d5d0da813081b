"""The Retrain page (AppTest), its queries (db/runs.py), the training arguments and tables
(engine/loop/retrain.py) and the figures (views/curves.py)."""

import re
import shlex
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CALIBRATION, open_page, page_text, tiny_checkpoint
from sqlalchemy import select

from db.queries import curated_set
from db.runs import active_run_id, best_epoch, epochs_frame, referable_threshold, runs_frame, validation_size
from db.schema import Epoch, Image, Job, Review, Run, Source, utcnow
from db.session import read_scope, session_scope
from db.users import LOCAL
from engine.data.datasets import folder_samples, person_halves, write_probabilities
from engine.data.sources import import_source
from engine.loop.retrain import (
    contribution_table,
    curated_counts,
    default_settings,
    original_counts,
    runs_table,
    settings_problem,
    train_job_args,
)
from engine.model.metrics import validation_screening
from engine.runtime import jobs
from engine.runtime.markdown import literal
from engine.runtime.workspace import Workspace
from engine.training.train import make_config, parse_args
from views.curves import (
    CURVES,
    confusion_figure,
    curated_figure,
    curve_figure,
    per_class_figure,
    reliability_figure,
)

TINY = {
    "name": "tiny",
    "model": "test_efficientnet",
    "img_size": 64,
    "epochs": 1,
    "batch_size": 8,
    "lr": 0.05,
    "lrf": 0.1,
    "optimizer": "adamw",
    "balance": "sampler",
    "loss": "ordinal",
    "enhance": False,
    "tta": 8,
    "select": "best",
    "augment": "light",
    "progressive": False,
    "pretrained": False,
    "weights": "",
    "refit": True,
    "folds": 1,
}


@pytest.fixture
def data(workspace: Workspace, tiny_data: Path) -> Workspace:
    """24 expert-labelled training images, 8 unlabelled, 16 for validation."""
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train", "aptos train")
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "aptos pool")
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation", "hq val")
    return workspace


def images_of(db_url: str, source: str) -> list[tuple[int, int | None]]:
    with session_scope(db_url) as session:
        return session.execute(
            select(Image.id, Image.grade).join(Source).where(Source.name == source).order_by(Image.id)
        ).all()


def review(db_url: str, image_id: int, decision: str, grade: int | None) -> None:
    with session_scope(db_url) as session:
        session.add(Review(image_id=image_id, decision=decision, grade=grade, reviewer="r"))


def add_run(
    db_url: str, name: str, qwks: list[float], errors: list | None = None, status: str = "done"
) -> int:
    """A finished run as the training job records it, with one Epoch row per QWK."""
    config = {
        "model": "test_efficientnet",
        "img_size": 64,
        "eval_size": 64,
        "epochs": len(qwks),
        "batch_size": 8,
        "lr": 0.01,
        "lrf": 0.01,
        "optimizer": "sgd",
        "warmup_epochs": 1.0,
        "balance": "loss",
        "pretrained": True,
        "train_counts": [10, 3, 6, 5],
    }
    with session_scope(db_url) as session:
        run = Run(
            name=name,
            model_name="test_efficientnet",
            img_size=64,
            config=config,
            status=status,
            checkpoint=f"/weights/{name}/best.pth",
            best_qwk=max(qwks),
            created_at=datetime(2026, 3, 1, 12, 30),
        )
        session.add(run)
        session.flush()
        for n, qwk in enumerate(qwks, start=1):
            session.add(
                Epoch(
                    run_id=run.id,
                    epoch=n,
                    lr=0.01 / n,
                    train_loss=1.4 / n,
                    train_acc=0.3 + 0.1 * n,
                    val_loss=1.5 / n,
                    val_acc=0.25 + 0.1 * n,
                    qwk=qwk,
                    precision=[0.5, 0.2, 0.4, 0.6 + n / 100],
                    recall=[0.7, 0.1, 0.3, 0.5],
                    confusion=[[3, 1, 0, 0], [1, 2, 1, 0], [0, 1, 2, 1], [0, 0, 1, 3]],
                    errors=errors or [],
                )
            )
        return run.id


def set_calibration(db_url: str, run_id: int, calibration: dict) -> None:
    with session_scope(db_url) as session:
        run = session.get(Run, run_id)
        run.calibration, run.temperature = calibration, calibration.get("temperature", 1.0)


def reliability_charts(at) -> list:
    return [c for c in at.get("plotly_chart") if "reliability" in c.proto.id]


def validation_errors(tiny_data: Path, count: int) -> list[list]:
    """[path, true, predicted] of real validation images, each predicted one grade off."""
    files = sorted((tiny_data / "validation").glob("*/*.png"))[:count]
    return [[str(f), int(f.parent.name), (int(f.parent.name) + 1) % 4] for f in files]


def wait_until_stopped(db_url: str, job_id: int, timeout: float = 90) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs.mark_dead_jobs(db_url)
        with session_scope(db_url) as session:
            job = session.get(Job, job_id)
        if job.status not in jobs.ACTIVE:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status}: {jobs.log_tail(job.log_path)}")


# -- the page ---------------------------------------------------------------------------------


def test_empty_workspace_says_there_is_nothing_yet(workspace):
    at = open_page("retrain")
    assert at.title[0].value == "Retrain"
    assert "No labelled data yet" in page_text(at) and "No runs yet" in page_text(at)
    assert not at.get("plotly_chart")
    assert "start_training" not in [b.key for b in at.button]


def test_curated_set_without_validation_source_asks_for_one(workspace, tiny_data):
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train", "aptos train")
    at = open_page("retrain")
    assert "No validation source yet" in page_text(at)
    assert len(at.get("plotly_chart")) == 1  # the curated set
    assert "start_training" not in [b.key for b in at.button]


def test_form_starts_a_training_job_and_cancel_stops_it(data):
    at = open_page("retrain")
    assert "24 training images, 0 of them pseudo-labels" in page_text(at)
    at.text_input(key="train_name").input("ui-run")
    at.number_input(key="train_img_size").set_value(64)
    at.number_input(key="train_epochs").set_value(2)
    at.radio(key="train_optimizer").set_value("adamw")
    at.checkbox(key="train_pretrained").uncheck()
    at.button(key="start_training").click().run()
    assert not at.exception, at.exception
    job = jobs.latest_job(data.db_url, "train")
    try:
        assert job is not None and f"Training job #{job.id} started: run {literal('ui-run')}" in page_text(at)
        assert job.params["model"] == "tf_efficientnet_lite0"  # the CPU's default
        assert job.params["img_size"] == 64 and job.params["epochs"] == 2
        command = shlex.split(Path(job.log_path).read_text().splitlines()[0].removeprefix("$ "))
        expected = [*train_job_args(job.params), "--job-id", str(job.id)]
        assert command[3:] == expected
        assert expected[expected.index("--pretrained") + 1] == "false"

        at.text_input(key="train_name").input("")
        at.button(key="start_training").click().run()  # one training at a time
        assert "Training did not start: another train job" in page_text(at)
        at.button(key="cancel_training").click().run()
        assert "Cancelling" in page_text(at)
    finally:
        if job is not None:
            jobs.cancel_job(data.db_url, job.id, user=LOCAL)  # idempotent; no process left behind
            stopped = wait_until_stopped(data.db_url, job.id)
    assert stopped.status == "cancelled"  # however early the cancel came
    at = open_page("retrain")
    assert "cancel_training" not in [b.key for b in at.button]


@pytest.mark.parametrize(
    "name, refusal",
    [
        ("taken", "A run named 'taken' exists already"),
        ("../x", "Run name '../x': use letters, digits, '-', '_' and '.' only"),
        ("/tmp/x", "Run name '/tmp/x': use letters"),
    ],
)
def test_a_name_in_use_or_outside_the_workspace_is_refused_with_a_sentence(data, name, refusal):
    add_run(data.db_url, "taken", [0.4])
    at = open_page("retrain")
    at.text_input(key="train_name").input(name)
    at.button(key="start_training").click().run()
    assert literal(refusal) in page_text(at)
    assert jobs.latest_job(data.db_url, "train") is None


def test_finished_run_shows_table_curves_metrics_and_error_gallery(data, tiny_data):
    errors = validation_errors(tiny_data, 6)
    add_run(data.db_url, "baseline", [0.31, 0.62, 0.55], errors)
    at = open_page("retrain")
    # the curated set, four curves, per-class precision/recall and the confusion matrix
    assert len(at.get("plotly_chart")) == 1 + len(CURVES) + 2
    table = at.dataframe[1].value
    row = table.iloc[0]
    assert (row["run"], row["model"], row["train per grade"], row["epochs"]) == (
        "baseline",
        "test_efficientnet",
        "10 / 3 / 6 / 5",
        "3/3",
    )
    assert row["best val QWK"] == pytest.approx(0.62) and row["best epoch"] == 2
    assert row["scheduler"] == "warm-up 1 ep + cosine" and row["status"] == "done"
    assert "best epoch 2: val QWK 0.620, accuracy 45.0%" in page_text(at)
    assert "Misclassified validation images** (6)" in page_text(at)
    assert len(at.image) == 2 * 4  # a page of four, each beside its preprocessed view
    assert at.image[0].captions == [
        literal(f"{Path(errors[0][0]).name}: true 0 · no DR → predicted 1 · mild")
    ]
    at.number_input(key=[w.key for w in at.number_input if w.key.startswith("errors_page")][0]).set_value(
        2
    ).run()
    assert not at.exception and len(at.image) == 2 * 2


def test_the_gallery_shows_grad_cam_on_request(data, tiny_data):
    errors = validation_errors(tiny_data, 6)
    run_id = add_run(data.db_url, "explained", [0.5], errors)
    at = open_page("retrain")
    at.toggle(key="errors_evidence").set_value(True).run()
    assert not at.exception, at.exception
    assert (
        f"No evidence: the model's checkpoint {literal('/weights/explained/best.pth')} is "
        "gone." in page_text(at)
    )
    assert len(at.image) == 2 * 4
    with session_scope(data.db_url) as session:
        session.get(Run, run_id).checkpoint = str(tiny_checkpoint(data.weights / "best.pth"))
    at.run()
    assert not at.exception, at.exception
    assert len(at.image) == 3 * 4  # each beside its preprocessed view and its Grad-CAM
    assert [image.captions for image in at.image[2::3]] == [
        [f"Grad-CAM of grade {predicted}"] for _, _, predicted in errors[:4]
    ]
    at.toggle(key="errors_evidence").set_value(False).run()
    assert len(at.image) == 2 * 4


def test_inspected_run_shows_its_calibration(data):
    set_calibration(data.db_url, add_run(data.db_url, "calibrated", [0.4, 0.7]), CALIBRATION)
    at = open_page("retrain")
    text = page_text(at)
    assert "Temperature T = 1.80, fitted on 200 validation images." in text
    assert "ECE 0.120 → 0.034, NLL 0.950 → 0.810 (before → after temperature scaling)." in text
    assert "Of 120 validation images at ≥ 0.70 confidence, 85 % were right." in text
    assert not at.warning and len(reliability_charts(at)) == 1
    assert '"before (T = 1)"' in reliability_charts(at)[0].proto.spec


def test_a_clipped_temperature_is_said_in_words(data):
    set_calibration(
        data.db_url,
        add_run(data.db_url, "clipped", [0.1]),
        {**CALIBRATION, "temperature": 4.0, "bounded": True},
    )
    at = open_page("retrain")
    assert not at.exception, at.exception
    assert [w.value for w in at.warning] == [
        "The temperature was clipped at its bound (T = 4.00): the validation set may be too "
        "small, or the model has not learned; its confidences are not to be trusted."
    ]


def test_old_runs_show_what_their_calibration_has(data):
    old = add_run(data.db_url, "old", [0.5])  # calibration {}: trained before it was stored
    at = open_page("retrain")
    assert not at.exception, at.exception
    assert "No calibration recorded for this run" in page_text(at)
    assert not reliability_charts(at)
    set_calibration(data.db_url, old, {"temperature": 2.0, "ece_before": 0.1, "ece_after": 0.05})
    at.run()
    assert not at.exception, at.exception
    assert "Temperature T = 2.00. ECE 0.100 → 0.050" in page_text(at)
    assert "No reliability diagram" in page_text(at) and not reliability_charts(at)


def test_running_job_shows_progress_and_live_curves_then_the_finished_run(data):
    run_id = add_run(data.db_url, "live", [0.3, 0.5], status="running")
    with session_scope(data.db_url) as session:
        job = Job(
            kind="train",
            status="running",
            progress=0.6,
            run_id=run_id,
            message="epoch 3/5, batch 2/4, 12.0 images/s",
            heartbeat_at=utcnow(),
        )
        session.add(job)
    at = open_page("retrain")
    assert "Training now" in [h.value for h in at.subheader]
    assert (
        at.main.get("progress")[0].proto.text == f"train #1: {literal('epoch 3/5, batch 2/4, 12.0 images/s')}"
    )
    live = [c for c in at.get("plotly_chart") if "live_curve" in c.proto.id]
    assert len(live) == len(CURVES)

    with session_scope(data.db_url) as session:  # the job ends while the page is open
        session.get(Job, 1).status = "done"
        session.get(Run, run_id).status = "done"
    at.run()
    assert not at.exception and "cancel_training" not in [b.key for b in at.button]
    assert at.dataframe[1].value["status"].tolist() == ["done"]


def test_failed_training_job_shows_its_error_and_log(data):
    log = data.logs / "train-1.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("epoch 1: lr 1.00e-02\nRuntimeError: out of memory\n")
    with session_scope(data.db_url) as session:
        session.add(
            Job(kind="train", status="failed", error="RuntimeError: out of memory", log_path=str(log))
        )
    at = open_page("retrain")
    assert f"train job #1 failed: {literal('RuntimeError: out of memory')}" in page_text(at)
    assert "epoch 1: lr 1.00e-02" in at.code[0].value


def test_promote_changes_the_active_model(data):
    old = add_run(data.db_url, "old", [0.5])
    new = add_run(data.db_url, "new", [0.4])
    add_run(data.db_url, "broken", [0.1], status="failed")
    assert active_run_id(data.db_url) is None  # rows made by hand: nothing promoted
    at = open_page("retrain")
    assert "No active model yet." in page_text(at)
    assert at.selectbox(key="promote_run").options == ["new", "old"]  # finished runs only
    at.button(key="promote").click().run()  # the picker starts at the newest
    assert active_run_id(data.db_url) == new and "Active model: **new**" in page_text(at)
    at.selectbox(key="promote_run").set_value(old)
    at.button(key="promote").click().run()
    assert active_run_id(data.db_url) == old
    assert "Active model: **old**" in page_text(at)
    assert at.selectbox(key="promote_run").value == old


def test_page_args_train_one_real_epoch(data):
    """The form's arguments are what the training CLI accepts: one epoch of the tiny model."""
    job_id = jobs.start_job(
        data, "train", "engine.training.train", train_job_args(TINY), params=TINY, user=LOCAL
    )
    job = wait_until_stopped(data.db_url, job_id, timeout=120)
    assert job.status == "done", jobs.log_tail(job.log_path)
    runs = runs_frame(data.db_url)
    assert list(runs["name"]) == ["tiny"] and runs["status"][0] == "done"
    assert runs["config"][0]["optimizer"] == "adamw" and runs["config"][0]["balance"] == "sampler"
    assert runs["config"][0]["train_counts"] == original_counts(curated_set(data.db_url))
    assert list(epochs_frame(data.db_url, [int(runs["id"][0])])["epoch"]) == [1]


def test_a_run_by_folds_records_each_models_curve_and_its_own_out_of_fold_figures(data):
    settings = {**TINY, "name": "folds", "folds": 2}
    job_id = jobs.start_job(
        data, "train", "engine.training.train", train_job_args(settings), params=settings, user=LOCAL
    )
    job = wait_until_stopped(data.db_url, job_id, timeout=180)
    assert job.status == "done", jobs.log_tail(job.log_path)
    runs = runs_frame(data.db_url)
    run_id = int(runs["id"][0])
    curves = epochs_frame(data.db_url, [run_id])
    assert list(curves["run"]) == ["folds", "folds · model 1", "folds · model 2"]
    own = best_epoch(data.db_url, run_id)  # the out-of-fold figures of every labelled image
    with read_scope(data.db_url) as session:
        run = session.scalar(select(Run).where(Run.id == run_id))
    labelled = len(curated_set(data.db_url)) + validation_size(data.db_url)
    assert sum(map(sum, own["confusion"])) == labelled and run.best_qwk == own["qwk"] == runs["best_qwk"][0]
    assert runs["epochs_done"][0] == 1 and run.config["folds"] == 2
    at = open_page("retrain")
    assert not at.exception and "folds" in page_text(at)
    assert len(curve_figure(curves, "Validation QWK").data) == 3  # the run's point, each model's curve


# -- db/runs.py ---------------------------------------------------------------------------------


def test_curated_images_follow_the_reviews_like_training_does(data):
    train, pool, val = (images_of(data.db_url, s) for s in ("aptos train", "aptos pool", "hq val"))
    review(data.db_url, pool[0][0], "accept", 2)
    review(data.db_url, pool[1][0], "relabel", 3)
    review(data.db_url, pool[2][0], "accept", 1)
    review(data.db_url, pool[2][0], "undo", None)  # the latest decision counts
    review(data.db_url, pool[3][0], "reject", None)
    review(data.db_url, val[0][0], "relabel", 0)  # the yardstick stays clean
    changed = (train[0][1] + 1) % 4
    review(data.db_url, train[0][0], "relabel", changed)  # stored before decide() refused it
    curated = curated_set(data.db_url).set_index("image_id")
    assert len(curated) == 24 + 2 and validation_size(data.db_url) == 16
    accepted, corrected = curated.loc[pool[0][0]], curated.loc[pool[1][0]]
    assert [accepted["source"], accepted["grade"], accepted["origin"]] == ["aptos pool", 2, "pseudo"]
    assert corrected["grade"] == 3 and pd.isna(corrected["expert_grade"])
    assert curated.loc[train[0][0], ["grade", "expert_grade", "origin"]].tolist() == [
        train[0][1],
        train[0][1],
        "expert",
    ]  # the expert's grade stands
    assert (curated.loc[[i for i, _ in train], "origin"] == "expert").all()


def test_runs_frame_picks_the_first_best_epoch_and_best_epoch_returns_its_details(db_url):
    first = add_run(db_url, "a", [0.2, 0.7, 0.7, 0.5], errors=[["/x.png", 1, 2]])
    with session_scope(db_url) as session:  # an imported checkpoint: no config, no epochs
        session.add(
            Run(
                name="imported",
                model_name="m",
                img_size=224,
                status="done",
                checkpoint="/c.pth",
                best_qwk=0.66,
            )
        )
    runs = runs_frame(db_url)
    assert list(runs["name"]) == ["imported", "a"]
    imported, a = runs.iloc[0], runs.iloc[1]
    assert (a["best_qwk"], a["best_epoch"], a["epochs_done"]) == (0.7, 2, 4)
    assert a["best_acc"] == pytest.approx(0.45)
    assert imported["best_qwk"] == 0.66 and imported["epochs_done"] == 0
    best = best_epoch(db_url, first)
    assert best["epoch"] == 2 and best["errors"] == [["/x.png", 1, 2]]
    assert len(best["confusion"]) == 4 and best["precision"][3] == pytest.approx(0.62)
    assert best_epoch(db_url, first + 1) is None
    curves = epochs_frame(db_url, [first])
    assert list(curves["epoch"]) == [1, 2, 3, 4] and set(curves["run"]) == {"a"}
    assert curves["train_loss"].tolist() == pytest.approx([1.4, 0.7, 1.4 / 3, 0.35])
    table = runs_table(runs)
    assert table["epochs"].isna().tolist() == [True, False] and table["epochs"][1] == "4/4"
    assert table["pretrained"].isna()[0] and table["pretrained"][1] == "ImageNet (offline)"


# -- engine/loop/retrain.py --------------------------------------------------------------------------


def test_train_job_args_are_what_the_training_cli_reads():
    settings = {**TINY, "progressive": True, "pretrained": True, "weights": " /w/v2s.pth "}
    config = make_config(parse_args(train_job_args(settings)))
    assert (config.model, config.img_size, config.eval_size, config.epochs) == (
        "test_efficientnet",
        64,
        64,
        1,
    )
    assert (config.batch_size, config.lr, config.lrf) == (8, 0.05, 0.1)
    assert (config.optimizer, config.balance, config.progressive) == ("adamw", "sampler", True)
    assert (config.loss, config.tta, config.select, config.augment) == ("ordinal", 8, "best", "light")
    assert config.preprocess["enhance"] is False
    assert config.pretrained == "/w/v2s.pth" and config.refit is True
    assert make_config(parse_args(train_job_args({**settings, "pretrained": False}))).pretrained is False
    assert make_config(parse_args(train_job_args({**settings, "refit": False}))).refit is False
    assert make_config(parse_args(train_job_args({**settings, "folds": 3}))).folds == 3
    args = parse_args(train_job_args(TINY))
    assert args.from_db and args.name == "tiny"


def test_cpu_defaults_are_the_clis_with_few_epochs():
    cpu = default_settings("cpu")
    config = make_config(parse_args(["--from-db", "--device", "cpu"]))
    assert (cpu["model"], cpu["img_size"], cpu["lr"], cpu["loss"], cpu["select"]) == (
        config.model,
        config.img_size,
        config.lr,
        config.loss,
        config.select,
    )
    assert cpu["epochs"] == 5 and config.minutes == 20
    assert settings_problem({**cpu, "name": "x"}, set()) is None


def test_the_form_evaluates_a_model_at_its_own_eval_size():
    settings = {**TINY, "model": "tf_efficientnetv2_s", "img_size": 300}
    config = make_config(parse_args(train_job_args(settings)))
    assert (config.img_size, config.eval_size) == (300, 384)


def test_settings_problems_are_sentences(tmp_path):
    assert "exists already" in settings_problem({**TINY, "name": "a"}, {"a"})
    missing = {**TINY, "pretrained": True, "weights": str(tmp_path / "none.pth")}
    assert "does not exist" in settings_problem(missing, set())
    assert settings_problem({**missing, "pretrained": False}, set()) is None
    assert settings_problem({**TINY, "model": " "}, set()) == "Choose a model."


def test_counts_and_contribution_table():
    curated = pd.DataFrame(
        {
            "image_id": [1, 2, 3, 4, 5],
            "source": ["t", "t", "t", "pool", "pool"],
            "grade": [0, 0, 2, 3, 0],
            "expert_grade": [0, 1, 2, None, None],
            "origin": ["expert", "pseudo", "expert", "pseudo", "pseudo"],
        }
    )
    assert original_counts(curated) == [1, 1, 1, 0]
    counts = curated_counts(curated)
    assert len(counts) == 3 * 4  # every grade of every (source, origin)
    table = contribution_table(counts).set_index(["source", "origin"])
    assert table.loc[("pool", "pseudo")].tolist() == [1, 0, 0, 1, 2]
    assert table.loc[("t", "expert")].tolist() == [1, 0, 1, 0, 2]
    assert table.loc[("t", "pseudo"), "total"] == 1


# -- views/curves.py ---------------------------------------------------------------------------


def test_curve_figures_hold_every_run_and_split():
    epochs = pd.DataFrame(
        {
            "run": ["a", "a", "b"],
            "epoch": [1, 2, 1],
            "lr": [0.01, 0.005, 0.02],
            "train_loss": [1.2, 0.9, 1.1],
            "val_loss": [1.3, 1.0, 1.2],
            "train_acc": [0.4, 0.5, 0.45],
            "val_acc": [0.35, 0.5, 0.4],
            "qwk": [0.2, 0.6, 0.3],
        }
    )
    loss = curve_figure(epochs, "Loss")
    assert [t.name for t in loss.data] == ["a · train", "a · val", "b · train", "b · val"]
    assert list(loss.data[1].y) == [1.3, 1.0] and loss.data[1].line.dash == "dash"
    assert loss.data[0].line.color == loss.data[1].line.color != loss.data[2].line.color
    single = curve_figure(epochs[epochs["run"] == "a"], "Validation QWK")
    assert [t.name for t in single.data] == ["val"] and list(single.data[0].y) == [0.2, 0.6]


def test_metric_figures_hold_the_numbers():
    confusion = [[5, 1, 0, 0], [2, 3, 0, 0], [0, 1, 4, 1], [0, 0, 2, 6]]
    heatmap = confusion_figure(confusion).data[0]
    assert [list(row) for row in heatmap.z] == confusion and heatmap.x[3].startswith("3")
    bars = per_class_figure([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]).data
    assert [b.name for b in bars] == ["precision", "recall"] and list(bars[1].y)[3] == 0.8
    counts = pd.DataFrame(
        {"source": ["t"] * 4, "origin": ["expert"] * 4, "grade": [0, 1, 2, 3], "count": [4, 3, 2, 1]}
    )
    curated = curated_figure(counts, [5, 3, 2, 1]).data
    assert curated[0].name == "t · expert label" and list(curated[0].y) == [4, 3, 2, 1]
    assert curated[-1].name == "original labelled set" and list(curated[-1].y) == [5, 3, 2, 1]


def test_reliability_figure_holds_both_diagrams_and_the_bin_sizes():
    figure = reliability_figure(CALIBRATION["reliability_before"], CALIBRATION["reliability_after"])
    diagonal, before, after = figure.data
    assert diagonal.name == "perfect calibration" and list(diagonal.y) == [0, 1]
    assert (before.name, list(before.x), list(before.y)) == ("before (T = 1)", [0.65, 0.96], [0.5, 0.8])
    assert (after.name, list(after.x), list(after.y)) == (
        "after temperature scaling",
        [0.56, 0.84],
        [0.55, 0.85],
    )
    assert [row[0] for row in after.customdata] == [80, 120]  # images per bin, on hover
    sizes = [*before.marker.size, *after.marker.size]
    assert sizes.index(max(sizes)) == 1 and sizes[0] < sizes[2] < sizes[3]  # 50 < 80 < 120
    assert len(reliability_figure([], CALIBRATION["reliability_after"]).data[1].x) == 0


def test_a_run_that_finishes_later_joins_the_comparison_and_the_promote_picker(data):
    first = add_run(data.db_url, "first", [0.5])
    at = open_page("retrain")
    assert at.multiselect(key="compare_runs").value == [first]
    second = add_run(data.db_url, "second", [0.6])  # finishes while the page is open
    at.run()
    assert at.multiselect(key="compare_runs").value == [second, first]
    assert at.selectbox(key="promote_run").value == second


# -- screening: the operating point, its intervals, and run differences ------------------------


def validated_run(workspace: Workspace, tiny_data: Path, name: str, skill: float) -> int:
    """A finished run whose checkpoint folder holds validation probabilities of the 16 tiny
    validation images (right with probability `skill`), and the screening the trainer stores."""
    samples = folder_samples(tiny_data / "validation")
    rng = np.random.default_rng(int(skill * 100))
    grades = np.array([s.grade for s in samples])
    guessed = np.where(rng.random(len(samples)) < skill, grades, rng.integers(0, 4, len(samples)))
    probs = np.eye(4)[guessed] * 0.6 + 0.1
    folder = workspace.weights / name
    (folder / "validation").mkdir(parents=True)
    write_probabilities(folder / "validation" / "validation.csv", samples, probs)
    screening = validation_screening(probs, grades, [s.group for s in samples], person_halves(samples, 0))
    run_id = add_run(workspace.db_url, name, [0.5])
    with session_scope(workspace.db_url) as session:
        session.get(Run, run_id).checkpoint = str(folder / "best.pth")
    set_calibration(workspace.db_url, run_id, {**CALIBRATION, "screening": {**screening, "seed": 0}})
    return run_id


def test_the_operating_point_shows_with_intervals_beside_the_roc_curve(data, tiny_data):
    run_id = validated_run(data, tiny_data, "screened", 0.8)
    at = open_page("retrain")
    text = page_text(at)
    stored = referable_threshold(data.db_url, run_id)
    assert f"Referable when P(grade ≥ 2) ≥ **{stored:.3f}**" in text
    assert "keeps a sensitivity of 87% on the 16 validation images" in text
    assert re.search(r"sensitivity \*\*\d+\.\d% \(95 % CI \d+\.\d% to \d+\.\d%\)\*\*", text)
    assert re.search(r"specificity \*\*\d+\.\d% \(95 % CI", text)
    roc = [c for c in at.get("plotly_chart") if "roc" in c.proto.id]
    assert len(roc) == 1 and '"operating point"' in roc[0].proto.spec
    # An admin asks for a more sensitive point: a lower threshold is stored and shown.
    at.number_input(key=f"target_sensitivity_{run_id}").set_value(0.99).run()
    at.button(key=f"set_point_{run_id}").click().run()
    assert not at.exception, at.exception
    lower = referable_threshold(data.db_url, run_id)
    assert lower < stored and f"≥ **{lower:.3f}**" in page_text(at)
    assert "keeps a sensitivity of 99%" in page_text(at)


def test_two_runs_differ_beyond_the_noise_or_not(data, tiny_data):
    validated_run(data, tiny_data, "weak", 0.3)
    validated_run(data, tiny_data, "strong", 0.95)
    at = open_page("retrain")
    at.multiselect(key="compare_runs").set_value([]).run()
    at.multiselect(key="compare_runs").select(data_run_id(data, "strong")).select(
        data_run_id(data, "weak")
    ).run()
    text = page_text(at)
    match = re.search(
        r"\*\*strong − weak\*\* on 16 shared validation images: QWK "
        r"([+-]\d\.\d{3}) \(95 % CI ([+-]\d\.\d{3}) to ([+-]\d\.\d{3})\), "
        r"(larger than its interval|within the noise)",
        text,
    )
    assert match, text
    value, low, high = map(float, match.groups()[:3])
    assert low <= value <= high
    assert (match.group(4) == "larger than its interval") == (low > 0 or high < 0)


def data_run_id(workspace: Workspace, name: str) -> int:
    with session_scope(workspace.db_url) as session:
        return session.scalar(select(Run.id).where(Run.name == name))
