"""What every page shares: the workspace, the signed-in user, job progress widgets,
thumbnails and the models' evidence."""

from pathlib import Path
from typing import Literal

import numpy as np
import streamlit as st

from db.schema import Job
from db.session import migrate
from db.users import NotAllowed, User, is_admin_now
from engine.data.images import ImageError, thumbnail
from engine.data.preprocess import PreprocessCache, PreprocessConfig
from engine.model.networks import describe_device, pick_device
from engine.model.quality import model_warnings
from engine.model.saliency import Explainer
from engine.runtime import jobs
from engine.runtime.markdown import literal
from engine.runtime.workspace import Workspace
from grades import GRADES


@st.cache_resource
def _opened(workspace: Workspace) -> Workspace:
    workspace.root.mkdir(parents=True, exist_ok=True)
    migrate(workspace.db_url)
    return workspace


def get_workspace() -> Workspace:
    """The workspace of this server, its database brought up to date once per process."""
    return _opened(Workspace.from_env())


def current_user() -> User:
    """Who uses this browser session: app.py signs them in before any page runs."""
    return st.session_state.user


def next_step_info(admin: str, reviewer: str) -> None:
    """What an empty page waits for, in words for who reads it: a reviewer cannot take the
    steps an admin can, nor see their controls."""
    st.info(admin if current_user().is_admin else reviewer)


@st.cache_resource
def device_label() -> str:
    return describe_device(pick_device())


def reset_on_new_options(key: str, options: list, default) -> None:
    """Set widget `key` to `default` when its options change (a run finished), so that a
    new run is offered at once instead of the choice made before it existed."""
    if st.session_state.get(f"{key}_options") != options:
        st.session_state[f"{key}_options"] = options
        st.session_state[key] = default


def job_status_ui(job) -> None:
    """One job's progress bar with its message, or its outcome."""
    if job.status in jobs.ACTIVE:
        st.progress(job.progress, text=f"{job.kind} #{job.id}: {literal(job.message or job.status)}")
        if job.cancel_requested_at is not None:  # from any machine: the job reads it itself
            st.info(f"Cancel requested: {job.kind} job #{job.id} stops at its next batch.")
    elif job.status == "failed":
        st.error(f"{job.kind} job #{job.id} failed: {literal(job.error)}")
        tail = jobs.log_tail(job.log_path)
        if tail:
            st.code(tail, language=None)
    elif job.status == "cancelled":
        st.warning(f"{job.kind} job #{job.id} was cancelled.")


def cancel_ui(job: Job, label: str, key: str) -> bool:
    """The Cancel button of a running job, drawn while the account is an admin as the database
    says now: the fragments that tick call it, and read the role again each tick, so that an
    admin demoted or disabled meanwhile loses it within one tick. True once the job was asked
    to stop; a refusal is shown in words."""
    db_url, user = get_workspace().db_url, current_user()
    if not is_admin_now(db_url, user) or not st.button(label, key=key):
        return False
    try:
        jobs.cancel_job(db_url, job.id, user=user)
    except NotAllowed as exc:
        st.warning(f"{literal(exc)}.")
        return False
    return True


def model_quality_ui(label: str, val_qwk: float | None, grade_counts: dict[int, int], model: str) -> None:
    """The model's validation QWK, and a warning for each reason not to trust its grades."""
    score = "no validation QWK recorded" if val_qwk is None else f"validation QWK {val_qwk:.3f}"
    st.caption(f"{label} · {score}")
    for warning in model_warnings(val_qwk, [grade_counts.get(g, 0) for g in GRADES], model):
        st.warning(warning)


@st.cache_data(max_entries=512, show_spinner=False)
def _thumbnail(path: str, mtime: float, width: int) -> np.ndarray:
    return thumbnail(Path(path), width)


@st.cache_resource(max_entries=2, show_spinner=False)
def _explainer(checkpoint: str, mtime: float, cache: Path) -> Explainer:
    return Explainer(Path(checkpoint), cache)


def explainer(checkpoint: str | None) -> Explainer | None:
    """The evidence of a run's model, one instance for every session (a checkpoint written
    anew gets a new one); None, said in words, when the checkpoint is gone or its model has no
    layer to explain."""
    if not checkpoint or not Path(checkpoint).is_file():
        st.warning(f"No evidence: the model's checkpoint {literal(checkpoint or '')} is gone.")
        return None
    try:
        return _explainer(checkpoint, Path(checkpoint).stat().st_mtime, get_workspace().cache)
    except ValueError as exc:
        st.warning(f"No evidence: {literal(exc)}.")
        return None


def image_pair_ui(
    path: str,
    caption: str,
    width: int = 240,
    fill: bool = False,
    explain: tuple[Explainer, int] | None = None,
) -> None:
    """The photograph beside its preprocessed view, or a sentence if the file is gone.
    `caption` is plain text (a file name in it shows as it is); `width` is the thumbnail's
    resolution; `fill` shows both as wide as their columns.
    `explain` (a model's Explainer and a grade) adds the Grad-CAM of that grade."""
    try:
        mtime = Path(path).stat().st_mtime
        panels = [
            (_thumbnail(path, mtime, width), literal(caption)),
            (PreprocessCache(get_workspace().cache).load(Path(path), PreprocessConfig()), "preprocessed"),
        ]
        if explain:
            model, grade = explain
            panels.append((model.saliency(Path(path), grade).overlay(), f"Grad-CAM of grade {grade}"))
    except (OSError, ImageError) as exc:
        st.warning(literal(f"{caption}: cannot show this image ({exc})."))
        return
    shown: Literal["stretch"] | int = "stretch" if fill else width
    for column, (image, text) in zip(st.columns(len(panels)), panels, strict=True):
        column.image(image, caption=text, width=shown)
