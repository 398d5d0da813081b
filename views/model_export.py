"""The Retrain page's model card of a finished run, for everyone, and its export as ONNX or
safetensors, for admins: a background job (engine.loop.export_model) whose folder is offered as a
zip once it is done."""

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from db.schema import Job
from db.users import NotAllowed
from engine.loop.export_model import DESCRIPTION, KIND, check_line, export_folder, latest_export, zipped
from engine.runtime import jobs
from engine.runtime.markdown import literal
from engine.training.model_card import CARD, RunUnusable, model_card, run_facts, software
from views.common import current_user, get_workspace, job_status_ui, reset_on_new_options

FORMATS = {"onnx": "Export ONNX", "safetensors": "Export safetensors"}


@st.cache_data(show_spinner=False)
def _software() -> dict:
    """The versions and commit that a card names, read once per server (they name the code
    that runs, which does not change under it), not with a git call on every rerun."""
    return software()


def model_export_ui(runs: pd.DataFrame) -> None:
    """A finished run's model card, and for admins its exports."""
    ready = runs[(runs["status"] == "done") & runs["checkpoint"].notna()]
    if ready.empty:
        return  # promote_ui says that no run has finished yet
    names = {int(i): name for i, name in zip(ready["id"], ready["name"], strict=True)}
    st.subheader("Model card and export")
    reset_on_new_options("card_run", list(names), next(iter(names)))  # the newest
    run_id = st.selectbox("Run", list(names), format_func=names.__getitem__, key="card_run")
    try:
        card = model_card(run_facts(get_workspace().db_url, run_id), _software())
    except RunUnusable as exc:
        st.info(f"No model card: {literal(exc)}.")
        return
    with st.expander("Model card"):
        st.markdown(card)  # our Markdown: the names in it that people wrote are escaped
    st.download_button(f"Download {CARD}", card, CARD, "text/markdown", key="card_download")
    if current_user().is_admin:
        export_ui(run_id, names[run_id])


def export_ui(run_id: int, name: str) -> None:
    """The export buttons, and the run's newest export: its progress, or how it ended."""
    for column, (fmt, label) in zip(st.columns(len(FORMATS)), FORMATS.items(), strict=True):
        if column.button(label, key=f"export_{fmt}"):
            start_export(run_id, name, fmt)
    db_url = get_workspace().db_url
    jobs.mark_dead_jobs(db_url)
    job = latest_export(db_url, run_id)
    if job is None:
        return
    if job.status in jobs.ACTIVE:
        export_progress_ui(run_id)
        return
    job_status_ui(job)  # a failure with its log's tail, or a cancel
    if job.status == "done":
        export_done_ui(job)


@st.fragment(run_every=2)
def export_progress_ui(run_id: int) -> None:
    """The running export's progress; once it has ended, the page again (which shows its
    outcome and stops this ticking)."""
    db_url = get_workspace().db_url
    jobs.mark_dead_jobs(db_url)
    job = latest_export(db_url, run_id)
    if job is None or job.status not in jobs.ACTIVE:
        st.rerun()
    job_status_ui(job)


def start_export(run_id: int, name: str, fmt: str) -> None:
    workspace = get_workspace()
    out = export_folder(workspace, name, fmt)
    try:
        job_id = jobs.start_job(
            workspace,
            KIND,
            "engine.loop.export_model",
            [name, "--format", fmt, "--out", str(out)],
            {"run": run_id, "format": fmt, "out": str(out)},
            user=current_user(),
        )
    except (jobs.JobRefused, NotAllowed) as exc:
        st.warning(f"The export did not start: {literal(exc)}.")
        return
    st.success(f"Export job #{job_id} started, into {literal(out)}.")


def export_done_ui(job: Job) -> None:
    out = Path(job.params["out"])
    try:
        about = json.loads((out / DESCRIPTION).read_text())
    except OSError:
        st.info(f"Export #{job.id}'s folder {literal(out)} is gone.")
        return
    st.success(f"Export #{job.id}, {about['format']}, in {literal(out)}: {literal(check_line(about))}.")
    # Zipped when clicked, on a thread of its own: an export is 15-50 MB.
    st.download_button(
        f"Download {out.name}.zip",
        lambda: zipped(out),
        f"{out.name}.zip",
        "application/zip",
        key="export_download",
    )
