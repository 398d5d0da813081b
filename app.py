"""DR grading: `streamlit run app.py`. Navigation, the sidebar, and the first-start demo."""

import os

import streamlit as st

from engine import jobs
from engine.demo import is_empty
from pages.common import device_label, get_workspace, job_status_ui

st.set_page_config(page_title="DR grading", page_icon="👁️", layout="wide")
workspace = get_workspace()


def start_demo_if_empty() -> None:
    """A first start with an empty workspace builds the demo data in a background job."""
    if os.environ.get("DR_DEMO", "1") == "0" or not is_empty(workspace.db_url):
        return
    if jobs.latest_job(workspace.db_url, "demo") is None:
        try:
            jobs.start_job(workspace, "demo", "engine.demo")
        except jobs.JobRefused:
            pass  # another browser session started it a moment ago


@st.fragment(run_every=2)
def jobs_ui() -> None:
    active = jobs.active_jobs(workspace.db_url)
    if not active:
        st.caption("No jobs running.")
    for job in active:
        job_status_ui(job)


def sidebar_ui() -> None:
    with st.sidebar:
        st.caption(f"Workspace: `{workspace.root}`")
        st.caption(f"Device: {device_label()}")
        st.subheader("Jobs")
        jobs_ui()


start_demo_if_empty()
sidebar_ui()
page = st.navigation([
    st.Page("pages/dataset.py", title="Dataset", icon="📊", default=True),
    st.Page("pages/inference.py", title="Inference", icon="🔮"),
    st.Page("pages/review.py", title="Review", icon="✅"),
    st.Page("pages/retrain.py", title="Retrain", icon="📈"),
])
page.run()
