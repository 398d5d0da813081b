"""Agreement page: how far the blind double reads agree on the ordinal scale, with each other
and with the model, where each reviewer's time goes and how their reads hold up, and the
adjudication of the reads that disagree (by an admin)."""

import math

import plotly.express as px
import streamlit as st

from db.reviews import (
    Conflict,
    DecidedMeanwhile,
    adjudicate,
    adjudication_queue,
    decisions_frame,
    describe,
    double_read_share,
    reads_frame,
)
from db.users import NotAllowed
from engine.loop.agreement import (
    CATEGORIES,
    REJECT,
    between_reviewers,
    confusion,
    per_grade,
    per_reviewer,
    read_pairs,
    with_model,
)
from engine.runtime.markdown import literal
from grades import GRADE_NAMES, GRADES
from views.common import current_user, get_workspace
from views.viewer import grading_viewer

workspace = get_workspace()


def _adjudicate(conflict: Conflict, grade: int | None) -> None:
    try:
        adjudicate(workspace.db_url, current_user(), conflict, grade)
    except DecidedMeanwhile as exc:
        st.session_state.adjudication_refusal = str(exc)
    except NotAllowed as exc:
        st.session_state.adjudication_refusal = f"{exc}."


def _label(category: int | str) -> str:
    return "rejected" if isinstance(category, str) else GRADE_NAMES[category]


def agreement_ui() -> None:
    reads = reads_frame(workspace.db_url)
    pairs = read_pairs(reads)
    st.caption(
        f"{double_read_share(workspace.db_url):.0%} of the candidates are read blind by "
        "two reviewers (set on the Review page)."
    )
    if pairs.empty:
        st.info("No image has two reads yet.")
        return
    overall = between_reviewers(pairs)
    reads_col, exact_col, qwk_col = st.columns(3)
    reads_col.metric("Images read twice", overall["reads"])
    exact_col.metric("Exact agreement", f"{overall['exact']:.0%}")
    qwk = overall["qwk"]
    qwk_col.metric(
        "Quadratic-weighted kappa",
        "–" if math.isnan(qwk) else f"{qwk:.3f}",
        help="Over the images both readers graded (a reject has no grade).",
    )
    st.subheader("Each reviewer and the model")
    st.dataframe(with_model(reads), key="with_model")
    st.subheader("Per grade")
    st.caption("Specific agreement: when one reader gives the grade, how often the other does.")
    st.dataframe(per_grade(pairs).rename(index=_label), key="per_grade")
    figure = px.imshow(
        confusion(pairs),
        text_auto=True,
        color_continuous_scale="Blues",
        labels={"y": "first read", "x": "second read", "color": "images"},
        x=list(map(_label, CATEGORIES)),
        y=list(map(_label, CATEGORIES)),
    )
    st.plotly_chart(figure, key="confusion")


REVIEWER_COLUMNS = {
    "decisions": st.column_config.NumberColumn("Decisions"),
    "median_seconds": st.column_config.NumberColumn(
        "Median s per image", format="%.1f", help="Time the card was on screen."
    ),
    "per_hour": st.column_config.NumberColumn(
        "Decisions per hour", format="%.0f", help="Per hour of time on cards."
    ),
    "double_reads": st.column_config.NumberColumn("Read twice"),
    "agreement": st.column_config.NumberColumn(
        "Agreement with the second reader",
        format="percent",
        help="Exact agreement with the other reader of the images read twice.",
    ),
    "adjudicated": st.column_config.NumberColumn("Adjudicated"),
    "accuracy": st.column_config.NumberColumn(
        "Accuracy against adjudication",
        format="percent",
        help="Reads of adjudicated images that match the adjudicated grade or reject.",
    ),
}


def reviewers_ui() -> None:
    """Admins see every reviewer's figures, as a reading centre's supervisor does; a reviewer
    sees their own, not how colleagues measure up."""
    st.subheader("Each reviewer's time and reads")
    decisions = decisions_frame(workspace.db_url)
    table = per_reviewer(decisions, reads_frame(workspace.db_url))
    shown = table.index if current_user().is_admin else [current_user().name]
    table = table[table.index.isin(shown)]
    if table.empty:
        st.info("No decisions yet.")
        return
    st.dataframe(table, column_config=REVIEWER_COLUMNS, key="reviewers")
    timed = decisions[decisions.reviewer.isin(shown)].dropna(subset=["seconds"])
    if not timed.empty:
        st.plotly_chart(
            px.box(
                timed,
                x="reviewer",
                y="seconds",
                points="all",
                labels={"seconds": "seconds on screen per image"},
            ),
            key="seconds",
        )


def adjudication_ui() -> None:
    st.header("Adjudication")
    if "adjudication_refusal" in st.session_state:
        st.warning(literal(st.session_state.pop("adjudication_refusal")))
    conflicts = adjudication_queue(workspace.db_url)
    if not conflicts:
        st.success("No conflicting reads wait for adjudication.")
        return
    st.caption(f"{len(conflicts)} image(s) with conflicting reads wait.")
    if not current_user().is_admin:  # a reviewer may be one of the readers: the reads stay blind
        st.info(
            "An admin adjudicates these reads; only admins see them, so that no reader learns another's read."
        )
        return
    conflict = conflicts[0]
    photo, side = st.columns([3, 1])
    with photo:
        grading_viewer(conflict.path, conflict.run_id, key="adjudication_viewer")
    with side:
        st.subheader(literal(conflict.name))
        if conflict.predicted is not None:
            st.caption(f"The model predicted {GRADE_NAMES[conflict.predicted]}.")
        for reviewer, decision, grade in conflict.reads:
            st.markdown(f"**{literal(reviewer)}** {describe(decision, grade)}")
        st.caption(f"The final grade is stored with your account, {literal(current_user().name)}.")
        for final in GRADES:
            st.button(
                GRADE_NAMES[final],
                key=f"adjudicate_{final}",
                on_click=_adjudicate,
                args=(conflict, final),
                width="stretch",
            )
        st.button(
            "Reject", key=f"adjudicate_{REJECT}", on_click=_adjudicate, args=(conflict, None), width="stretch"
        )


st.title("Agreement")
agreement_ui()
reviewers_ui()
adjudication_ui()
