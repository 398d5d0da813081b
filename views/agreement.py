"""Agreement page: how far the blind double reads agree on the ordinal scale, with each other
and with the model, and the adjudication of the reads that disagree (by an admin)."""

import math

import plotly.express as px
import streamlit as st

from db.reviews import (Conflict, DecidedMeanwhile, adjudicate, adjudication_queue, describe,
                        double_read_share, reads_frame)
from engine.agreement import (CATEGORIES, REJECT, between_reviewers, confusion, per_grade,
                              read_pairs, with_model)
from grades import GRADE_NAMES
from views.common import current_user, get_workspace, image_pair_ui

workspace = get_workspace()


def _adjudicate(conflict: Conflict, grade: int | None) -> None:
    try:
        adjudicate(workspace.db_url, current_user().name, conflict, grade)
    except DecidedMeanwhile as exc:
        st.session_state.adjudication_refusal = str(exc)


def _label(category: int | str) -> str:
    return GRADE_NAMES.get(category, "rejected")


def agreement_ui() -> None:
    reads = reads_frame(workspace.db_url)
    pairs = read_pairs(reads)
    st.caption(f"{double_read_share(workspace.db_url):.0%} of the candidates are read blind by "
               "two reviewers (set on the Review page).")
    if pairs.empty:
        st.info("No image has two reads yet.")
        return
    overall = between_reviewers(pairs)
    reads_col, exact_col, qwk_col = st.columns(3)
    reads_col.metric("Images read twice", overall["reads"])
    exact_col.metric("Exact agreement", f"{overall['exact']:.0%}")
    qwk = overall["qwk"]
    qwk_col.metric("Quadratic-weighted kappa", "–" if math.isnan(qwk) else f"{qwk:.3f}",
                   help="Over the images both readers graded (a reject has no grade).")
    st.subheader("Each reviewer and the model")
    st.dataframe(with_model(reads), key="with_model")
    st.subheader("Per grade")
    st.caption("Specific agreement: when one reader gives the grade, how often the other does.")
    st.dataframe(per_grade(pairs).rename(index=_label), key="per_grade")
    figure = px.imshow(confusion(pairs), text_auto=True, color_continuous_scale="Blues",
                       labels={"y": "first read", "x": "second read", "color": "images"},
                       x=list(map(_label, CATEGORIES)), y=list(map(_label, CATEGORIES)))
    st.plotly_chart(figure, key="confusion")


def adjudication_ui() -> None:
    st.header("Adjudication")
    if "adjudication_refusal" in st.session_state:
        st.warning(st.session_state.pop("adjudication_refusal"))
    conflicts = adjudication_queue(workspace.db_url)
    if not conflicts:
        st.success("No conflicting reads wait for adjudication.")
        return
    conflict = conflicts[0]
    st.caption(f"{len(conflicts)} image(s) with conflicting reads wait.")
    st.subheader(conflict.name)
    if conflict.predicted is not None:
        st.caption(f"The model predicted {GRADE_NAMES[conflict.predicted]}.")
    image_pair_ui(conflict.path, conflict.name)
    for reviewer, decision, grade in conflict.reads:
        st.markdown(f"**{reviewer}** {describe(decision, grade)}")
    if not current_user().is_admin:
        st.info("An admin adjudicates these reads.")
        return
    st.caption(f"The final grade is stored with your account, {current_user().name}.")
    for column, grade in zip(st.columns(len(CATEGORIES)), CATEGORIES):
        final = None if grade == REJECT else grade
        column.button("Reject" if final is None else GRADE_NAMES[grade],
                      key=f"adjudicate_{grade}", on_click=_adjudicate, args=(conflict, final),
                      width="stretch")


st.title("Agreement")
agreement_ui()
adjudication_ui()
