"""What every page shares: the workspace, job progress widgets, thumbnails."""

from pathlib import Path

import numpy as np
import streamlit as st

from db.session import migrate
from engine import jobs
from grades import GRADES
from engine.images import ImageError, thumbnail
from engine.models import describe_device, pick_device
from engine.preprocess import PreprocessCache, PreprocessConfig
from engine.quality import model_warnings
from engine.workspace import Workspace


@st.cache_resource
def _opened(workspace: Workspace) -> Workspace:
    workspace.root.mkdir(parents=True, exist_ok=True)
    migrate(workspace.db_url)
    return workspace


def get_workspace() -> Workspace:
    """The workspace of this server, its database brought up to date once per process."""
    return _opened(Workspace.from_env())


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
        st.progress(job.progress, text=f"{job.kind} #{job.id}: {job.message or job.status}")
    elif job.status == "failed":
        st.error(f"{job.kind} job #{job.id} failed: {job.error}")
        tail = jobs.log_tail(job.log_path)
        if tail:
            st.code(tail, language=None)
    elif job.status == "cancelled":
        st.warning(f"{job.kind} job #{job.id} was cancelled.")


def model_quality_ui(label: str, val_qwk: float | None, grade_counts: dict[int, int],
                     model: str) -> None:
    """The model's validation QWK, and a warning for each reason not to trust its grades."""
    score = "no validation QWK recorded" if val_qwk is None else f"validation QWK {val_qwk:.3f}"
    st.caption(f"{label} · {score}")
    for warning in model_warnings(val_qwk, [grade_counts.get(g, 0) for g in GRADES], model):
        st.warning(warning)


@st.cache_data(max_entries=512, show_spinner=False)
def _thumbnail(path: str, mtime: float, width: int) -> np.ndarray:
    return thumbnail(Path(path), width)


def image_pair_ui(path: str, caption: str, width: int = 240, fill: bool = False) -> None:
    """The photograph beside its preprocessed view, or a sentence if the file is gone.
    `width` is the thumbnail's resolution; `fill` shows both as wide as their columns."""
    try:
        mtime = Path(path).stat().st_mtime
        original = _thumbnail(path, mtime, width)
        processed = PreprocessCache(get_workspace().cache).load(Path(path), PreprocessConfig())
    except (OSError, ImageError) as exc:
        st.warning(f"{caption}: cannot show this image ({exc}).")
        return
    left, right = st.columns(2)
    shown = "stretch" if fill else width
    left.image(original, caption=caption, width=shown)
    right.image(processed, caption="preprocessed", width=shown)
