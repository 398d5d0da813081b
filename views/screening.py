"""The Retrain page's screening figures: the operating point for referable DR with its
sensitivity and specificity beside the ROC curve, and whether two runs differ by more than
the noise of the validation images."""

import math

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from db.runs import run_calibration, run_checkpoint, set_screening
from db.users import NotAllowed
from engine.data.datasets import read_probabilities
from engine.runtime.markdown import literal
from engine.training.screening import (
    choose_operating_point,
    paired_difference,
    validation_file,
    validation_roc,
)
from views.common import current_user, get_workspace


def figure_text(figure: dict | None, form: str = ".3f") -> str:
    """A figure with its 95 % interval, in words: `form` ".1%" for a share, "+.3f" for a
    difference."""
    if not figure or not math.isfinite(figure["value"]):
        return "n/a"
    low, high = figure["interval"]
    return f"{figure['value']:{form}} (95 % CI {low:{form}} to {high:{form}})"


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, point: tuple[float, float] | None) -> go.Figure:
    traces = [
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            name="chance",
            line={"color": "grey", "dash": "dot"},
            hoverinfo="skip",
        ),
        go.Scatter(x=fpr, y=tpr, mode="lines", name="validation images", line={"shape": "hv"}),
    ]
    if point:
        traces.append(
            go.Scatter(
                x=[1 - point[1]],
                y=[point[0]],
                mode="markers",
                name="operating point",
                marker={"size": 12, "symbol": "x"},
            )
        )
    figure = go.Figure(traces)
    figure.update_layout(
        title="Referable DR (grade ≥ 2): ROC on the validation images",
        xaxis_title="1 − specificity",
        yaxis_title="sensitivity",
        xaxis_range=[-0.01, 1.01],
        yaxis_range=[-0.01, 1.01],
        margin={"t": 40, "b": 10},
        height=360,
    )
    return figure


def screening_ui(run_id: int) -> None:
    """The run's operating point, its figures with intervals, the ROC curve, and (admins) a
    target sensitivity to choose another point."""
    st.markdown("**Screening: referable DR at the operating point**")
    screening = run_calibration(get_workspace().db_url, run_id).get("screening")
    checkpoint = run_checkpoint(get_workspace().db_url, run_id)
    path = validation_file(checkpoint) if checkpoint else None
    if not screening or not checkpoint or path is None:
        st.info(
            "No operating point for this run: it was trained before operating points were "
            "chosen on validation, imported from a file, or it is still training."
        )
        return
    st.markdown(
        f"Referable when P(grade ≥ 2) ≥ **{screening['threshold']:.3f}**, the most specific "
        f"point that keeps a sensitivity of {screening['target_sensitivity']:.0%} on the "
        f"{screening['images']} validation images. Judged on each half of them (by person) at "
        f"the point chosen on the other half: sensitivity "
        f"**{figure_text(screening['sensitivity'], '.1%')}**, specificity "
        f"**{figure_text(screening['specificity'], '.1%')}**; referable AUC "
        f"{figure_text(screening['referable_auc'])}, QWK {figure_text(screening['qwk'])}."
    )
    st.plotly_chart(roc_figure(*validation_roc(path, screening["threshold"])), key="roc")
    if current_user().is_admin:
        target_ui(run_id, checkpoint, screening)


def target_ui(run_id: int, checkpoint: str, screening: dict) -> None:
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    target = left.number_input(
        "Target sensitivity",
        0.50,
        0.99,
        float(screening["target_sensitivity"]),
        0.01,
        format="%.2f",
        key=f"target_sensitivity_{run_id}",
        help="The operating point becomes the most specific one that "
        "keeps this sensitivity on the validation images. Gulshan et "
        "al. 2016 gave a high-sensitivity and a high-specificity point.",
    )
    if right.button("Set operating point", key=f"set_point_{run_id}"):
        try:
            set_screening(
                get_workspace().db_url,
                run_id,
                choose_operating_point(checkpoint, target, screening.get("seed", 0)),
                current_user(),
            )
        except NotAllowed as exc:
            st.error(f"Not changed: {literal(exc)}.")
            return
        st.rerun()


def difference_ui(names: dict[int, str], chosen: list[int]) -> None:
    """QWK and AUC of the first chosen run minus the second's on their shared validation
    images, with the interval that says whether it is more than noise."""
    if len(chosen) < 2:
        return
    first, second = chosen[:2]
    first_file, second_file = (
        validation_file(run_checkpoint(get_workspace().db_url, run) or "") for run in (first, second)
    )
    if first_file is None or second_file is None:
        st.caption(
            f"No difference with an interval for {literal(names[first])} and "
            f"{literal(names[second])}: "
            "one of them has no stored validation probabilities."
        )
        return
    difference = paired_difference(read_probabilities(first_file), read_probabilities(second_file))
    if difference["images"] == 0:
        st.caption(
            f"{literal(names[first])} and {literal(names[second])} were validated on different images."
        )
        return
    verdicts = []
    for key, label in (("qwk", "QWK"), ("referable_auc", "referable AUC")):
        figure = difference[key]
        verdict = (
            "larger than its interval" if figure["beyond_noise"] else "within the noise: the interval holds 0"
        )
        verdicts.append(f"{label} {figure_text(figure, '+.3f')}, {verdict}")
    st.markdown(
        f"**{literal(names[first])} − {literal(names[second])}** on "
        f"{difference['images']} shared validation images: " + "; ".join(verdicts) + "."
    )
