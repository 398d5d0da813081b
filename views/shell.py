"""What every script run begins with: sign-in, navigation, the sidebar, and the first-start
demo. app.py calls main() for each run."""

import os

import streamlit as st

from db.reviews import loop_overview
from db.runs import active_run_id
from db.users import LOCAL, User
from engine.loop.demo import demo_args, is_empty
from engine.runtime import jobs
from engine.runtime.markdown import literal
from grades import REVIEW_THRESHOLD
from views.common import device_label, get_workspace, job_status_ui
from views.signin import sign_out_ui, signed_in_user


def pages(admin: bool) -> list:
    return [
        st.Page("views/dataset.py", title="Dataset", icon=":material/bar_chart:", default=True),
        st.Page("views/inference.py", title="Inference", icon=":material/online_prediction:"),
        st.Page("views/review.py", title="Review", icon=":material/task_alt:"),
        st.Page("views/agreement.py", title="Agreement", icon=":material/handshake:"),
        st.Page("views/retrain.py", title="Retrain", icon=":material/monitoring:"),
        *([st.Page("views/accounts.py", title="Accounts", icon=":material/key:")] if admin else []),
    ]


def start_demo_if_empty(user: User) -> None:
    """A first start with an empty workspace builds the demo data in a background job, once
    an admin uses the app."""
    workspace = get_workspace()
    setting = os.environ.get("DR_DEMO", "1")
    if setting == "0" or not user.is_admin or not is_empty(workspace.db_url):
        return
    if jobs.latest_job(workspace.db_url, "demo") is None:
        try:
            jobs.start_job(workspace, "demo", "engine.loop.demo", demo_args(setting), user=user)
        except jobs.JobRefused:
            pass  # another browser session started it a moment ago
        except ValueError as exc:
            st.error(literal(exc))


def jobs_panel() -> None:
    active = jobs.active_jobs(get_workspace().db_url)
    if not active:
        st.caption("No jobs running.")
    for job in active:
        job_status_ui(job)


# A fragment that ticks delays a click that comes while it runs: on the Review page, by up to
# a second in three decisions out of five with these two at 2 s and 5 s. So the jobs tick only
# while one runs (a job started meanwhile shows at the next click), and the counts slowly.
jobs_ticking = st.fragment(run_every=2)(jobs_panel)
jobs_still = st.fragment(jobs_panel)


@st.fragment(run_every=30)
def overview_ui() -> None:
    """Where the loop stands: label, train, predict, review, retrain."""
    db_url = get_workspace().db_url
    counts = loop_overview(db_url, active_run_id(db_url), REVIEW_THRESHOLD)
    stages = [
        ("Labelled", "labelled", "expert-labelled training images"),
        ("Runs", "runs", "training runs"),
        ("Predicted", "predicted", "images the active model graded"),
        ("Candidates", "candidates", f"predictions at or above {REVIEW_THRESHOLD:.2f} confidence"),
        ("Reviewed", "reviewed", "candidates with a decision"),
    ]
    cells = st.columns(2) + st.columns(2) + st.columns(2)  # three rows of two: the sixth stays empty
    for column, (label, key, meaning) in zip(cells, stages, strict=False):
        column.metric(label, counts[key], help=meaning)


def sidebar_ui(user: User) -> None:
    with st.sidebar:
        if user == LOCAL:
            st.caption("No accounts: used on this machine only, as its one admin.")
        else:
            st.caption(f"Signed in as **{literal(user.name)}** ({user.role})")
            sign_out_ui(get_workspace().db_url)
        st.caption(f"Workspace: `{get_workspace().root}`")
        st.caption(f"Device: {device_label()}")
        overview_ui()
        st.subheader("Jobs")
        (jobs_ticking if jobs.active_jobs(get_workspace().db_url) else jobs_still)()


def main() -> None:
    # No page_icon: a material icon there is fetched from the internet, an emoji needs a font.
    st.set_page_config(page_title="DR grading", layout="wide")
    user = signed_in_user(get_workspace().db_url)
    if user is None:
        # Known but not shown, so that a bookmarked page opens once the sign-in is done.
        st.navigation(pages(admin=False), position="hidden")
        st.stop()  # nothing of the workspace before a sign-in
    st.session_state.user = user
    start_demo_if_empty(user)
    sidebar_ui(user)
    st.navigation(pages(user.is_admin)).run()
