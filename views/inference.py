"""Inference page: run a trained model over a pool of images as a background job, then look
at its confidence, its predicted grades and the review candidates, and download the
submission CSV."""

from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from db.predictions import Model, Pool, confidence_histogram, grade_counts, models, pools, submission_frame
from db.runs import active_run_id, referable_threshold, run_config
from db.users import NotAllowed
from engine.model.infer import submission_path
from engine.model.networks import pick_device
from engine.model.predictor import TTA_VIEWS, default_batch_size
from engine.runtime import jobs
from engine.runtime.distributed import local_processes
from engine.runtime.markdown import literal
from grades import GRADE_NAMES, GRADES, REVIEW_THRESHOLD
from views.common import (
    cancel_ui,
    current_user,
    get_workspace,
    job_status_ui,
    model_quality_ui,
    next_step_info,
)

workspace = get_workspace()


def model_label(model: Model, active: int | None) -> str:
    qwk = "no val QWK" if model.best_qwk is None else f"val QWK {model.best_qwk:.3f}"
    mark = " · active" if model.id == active else ""
    return f"{model.name} · {qwk} · {model.trained_at:%Y-%m-%d %H:%M}{mark}"


def pool_label(pool: Pool) -> str:
    return f"{pool.name} ({pool.role}, {pool.images} images)"


def choice_ui(choices: list[Model], sources: list[Pool]) -> tuple[Model, Pool]:
    active = active_run_id(workspace.db_url)
    by_id, pool_by_id = {m.id: m for m in choices}, {p.id: p for p in sources}
    left, right = st.columns(2)
    model_id = left.selectbox(
        "Model",
        list(by_id),
        key="infer_model",
        index=list(by_id).index(active) if active in by_id else 0,
        format_func=lambda i: model_label(by_id[i], active),
    )
    # Ids, not rows, as options: a row changes when its pool grows, and the choice must stay.
    pool_id = right.selectbox(
        "Pool", list(pool_by_id), key="infer_pool", format_func=lambda i: pool_label(pool_by_id[i])
    )
    return by_id[model_id], pool_by_id[pool_id]


def start(model: Model, pool: Pool, tta: int | None, redo: bool, batch_size: int) -> None:
    if not Path(model.checkpoint).is_file():
        st.error(
            f"The checkpoint of {literal(model.name)} is gone: {literal(model.checkpoint)} does not exist."
        )
        return
    out = submission_path(workspace, model.name, pool.name)
    # --source=NAME: a name that starts with '-' stays the option's value.
    args = [
        "--checkpoint",
        model.checkpoint,
        f"--source={pool.name}",
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        *(["--tta", str(tta)] if tta else []),
        *(["--redo"] if redo else []),
    ]
    processes = local_processes(pick_device())  # one per GPU, the pool shared among them
    params = {
        "run_id": model.id,
        "source_id": pool.id,
        "source": pool.name,
        "out": str(out),
        "tta": tta,
        "redo": redo,
        "batch_size": batch_size,
        "processes": processes,
    }
    try:
        jobs.start_job(workspace, "infer", "engine.model.infer", args, params, processes, user=current_user())
    except (jobs.JobRefused, NotAllowed) as exc:
        st.warning(f"Inference not started: {literal(exc)}.")


def start_ui(model: Model, pool: Pool) -> None:
    left, right = st.columns(2)
    tta = left.radio(
        "Test-time views",
        [None, *TTA_VIEWS],
        horizontal=True,
        key="infer_tta",
        format_func=lambda n: "as calibrated" if n is None else str(n),
        help="Each image averaged over 1, 2 (its mirror too) or 8 views (the "
        "mirrors of its four quarter turns); n views take n times as long. As "
        "calibrated: the views the model's temperature was fitted with.",
    )
    redo = left.checkbox(
        "Predict again the images this model has predicted",
        key="infer_redo",
        help="Otherwise a run predicts only the images left, as after a cancel or a crash.",
    )
    batch_size = right.number_input(
        "Batch size",
        min_value=1,
        max_value=1024,
        value=default_batch_size(pick_device()),
        step=1,
        key="infer_batch_size",
    )
    calibrated_views = run_config(workspace.db_url, model.id).get("tta")
    if tta and calibrated_views and tta != calibrated_views:
        st.warning(
            f"{literal(model.name)} was calibrated with {calibrated_views} test-time "
            f"views: with {tta} its confidences, the review threshold and the operating "
            "point for referable DR are not calibrated."
        )
    if pick_device().type == "cpu":
        st.caption(
            "On this CPU onnxruntime grades the images, several times as fast as PyTorch "
            "with the same grades; a model's first job exports it for that (up to a "
            "minute)."
        )
    if st.button("Start inference", key="start_inference", type="primary"):
        start(model, pool, tta, redo, int(batch_size))


@st.fragment(run_every=1)
def progress_ui() -> None:
    jobs.mark_dead_jobs(workspace.db_url)
    job = jobs.latest_job(workspace.db_url, "infer")
    if job is None or job.status not in jobs.ACTIVE:
        st.rerun()  # the whole page, so that the results show
    job_status_ui(job)
    cancel_ui(job, "Cancel", "cancel_inference")


def job_ui(model: Model, pool: Pool) -> None:
    """The running job, whichever model it runs; the last outcome of this model on this pool."""
    job = jobs.latest_job(workspace.db_url, "infer")
    if job is None:
        return
    if job.status in jobs.ACTIVE:
        progress_ui()
    elif job.params.get("run_id") == model.id and job.params.get("source_id") == pool.id:
        job_status_ui(job)


def charts_ui(model: Model, pool: Pool, counts: dict[int, int]) -> None:
    histogram = confidence_histogram(workspace.db_url, model.id, pool.id)
    histogram["grade"] = histogram["grade"].map(GRADE_NAMES)
    bars = pd.DataFrame(
        {"grade": [GRADE_NAMES[g] for g in GRADES], "images": [counts.get(g, 0) for g in GRADES]}
    )
    left, right = st.columns(2)
    with left:
        st.subheader("Confidence")
        figure = px.bar(
            histogram,
            x="confidence",
            y="count",
            color="grade",
            labels={"confidence": "confidence (bin start)", "count": "images"},
            category_orders={"grade": list(GRADE_NAMES.values())},
        )
        st.plotly_chart(figure, key="infer_confidence")
    with right:
        st.subheader("Predicted grades")
        st.plotly_chart(px.bar(bars, x="grade", y="images", text="images"), key="infer_grades")


def candidates_ui(model: Model, pool: Pool) -> None:
    st.subheader("Review candidates")
    threshold = st.slider("Confidence threshold", 0.0, 1.0, REVIEW_THRESHOLD, 0.01, key="infer_threshold")
    counts = grade_counts(workspace.db_url, model.id, pool.id, threshold)
    for column, grade in zip(st.columns(len(GRADES)), GRADES, strict=True):
        column.metric(GRADE_NAMES[grade], counts.get(grade, 0))
    st.caption(f"{sum(counts.values())} predictions at or above {threshold:.2f} would go to the Review page.")


def download_ui(model: Model, pool: Pool) -> None:
    # Built from the database when clicked, so it works even if the job's file is gone.
    st.download_button(
        "Download submission CSV",
        key="download_submission",
        mime="text/csv",
        file_name=submission_path(workspace, model.name, pool.name).name,
        on_click="ignore",
        data=lambda: submission_frame(
            workspace.db_url, model.id, pool.id, referable_threshold(workspace.db_url, model.id)
        ).to_csv(index=False),
    )


def referable_ui(model: Model, pool: Pool) -> None:
    """How many images the model refers at its operating point."""
    threshold = referable_threshold(workspace.db_url, model.id)
    if threshold is None:
        st.caption(
            f"{literal(model.name)} has no operating point for referable DR (trained "
            "before they were chosen on validation, or imported): the CSV has no "
            "referable column."
        )
        return
    frame = submission_frame(workspace.db_url, model.id, pool.id, threshold)
    referred = int((frame["referable"] == "yes").sum())
    st.metric(
        "Referable DR (grade ≥ 2)",
        f"{referred} of {len(frame)}",
        help=f"At the model's operating point: P(grade ≥ 2) ≥ {threshold:.3f}, chosen on "
        "validation (the Retrain page shows its sensitivity and specificity).",
    )


def results_ui(model: Model, pool: Pool, counts: dict[int, int]) -> None:
    if not counts:
        st.info(
            f"No predictions yet of {literal(model.name)} for {literal(pool.name)}: start inference above."
        )
        return
    charts_ui(model, pool, counts)
    referable_ui(model, pool)
    candidates_ui(model, pool)
    if current_user().is_admin:
        download_ui(model, pool)


st.title("Inference")
choices, sources = models(workspace.db_url), pools(workspace.db_url)
if not choices:
    next_step_info(
        "No trained models yet: train one on the Retrain page or with `python -m engine.training.train`.",
        "No trained models yet: an admin trains one.",
    )
if not sources:
    next_step_info(
        "No image sources yet: import a pool on the Dataset page, or from a "
        "terminal, for example `python -m engine.data.sources import --kind aptos --path "
        "/data/aptos --role unlabelled`.",
        "No image sources yet: an admin imports a pool of images.",
    )
if choices and sources:
    chosen_model, chosen_pool = choice_ui(choices, sources)
    predicted = grade_counts(workspace.db_url, chosen_model.id, chosen_pool.id)
    model_quality_ui(
        f"Model **{literal(chosen_model.name)}**", chosen_model.best_qwk, predicted, "The chosen model"
    )
    if current_user().is_admin:
        start_ui(chosen_model, chosen_pool)
    job_ui(chosen_model, chosen_pool)
    results_ui(chosen_model, chosen_pool, predicted)
