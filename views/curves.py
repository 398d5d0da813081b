"""Plotly figures of the Retrain page: training curves (one run or several overlaid), the
confusion matrix, per-class precision and recall, the reliability diagram, and the curated
set's make-up."""

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from grades import GRADE_NAMES, GRADES

# title -> (y axis, [(epochs_frame column, trace label)])
CURVES: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "Learning rate": ("lr", [("lr", "lr")]),
    "Loss": ("cross-entropy", [("train_loss", "train"), ("val_loss", "val")]),
    "Accuracy": ("accuracy", [("train_acc", "train"), ("val_acc", "val")]),
    "Validation QWK": ("QWK", [("qwk", "val")]),
}
COLOURS = px.colors.qualitative.Plotly


def curve_figure(epochs: pd.DataFrame, title: str) -> go.Figure:
    """One panel of CURVES over epochs; with several runs, one colour per run and the train
    curve solid, the validation curve dashed."""
    y_title, columns = CURVES[title]
    figure = go.Figure()
    runs = list(dict.fromkeys(epochs["run"]))
    for n, run in enumerate(runs):
        part = epochs[epochs["run"] == run]
        for column, label in columns:
            figure.add_trace(
                go.Scatter(
                    x=part["epoch"],
                    y=part[column],
                    mode="lines+markers",
                    name=label if len(runs) == 1 else f"{run} · {label}",
                    legendgroup=run,
                    line={
                        "color": COLOURS[n % len(COLOURS)],
                        "dash": "dash" if label == "val" and len(columns) > 1 else "solid",
                    },
                )
            )
    figure.update_layout(
        title=title, xaxis_title="epoch", yaxis_title=y_title, margin={"t": 40, "b": 10}, height=300
    )
    figure.update_xaxes(dtick=1 if epochs["epoch"].nunique() <= 20 else None)
    return figure


def curve_figures(epochs: pd.DataFrame) -> list[go.Figure]:
    """Every panel of CURVES."""
    return [curve_figure(epochs, title) for title in CURVES]


def confusion_figure(confusion: list[list[int]]) -> go.Figure:
    """Rows are true grades, columns predicted grades; each cell shows its count."""
    labels = [GRADE_NAMES[g] for g in GRADES]
    figure = go.Figure(
        go.Heatmap(
            z=confusion,
            x=labels,
            y=labels,
            colorscale="Blues",
            text=confusion,
            texttemplate="%{text}",
            showscale=False,
        )
    )
    figure.update_layout(
        title="Confusion matrix",
        xaxis_title="predicted",
        yaxis_title="true",
        yaxis_autorange="reversed",
        margin={"t": 40, "b": 10},
        height=360,
    )
    return figure


def per_class_figure(precision: list[float], recall: list[float]) -> go.Figure:
    """Precision and recall of every grade side by side."""
    labels = [GRADE_NAMES[g] for g in GRADES]
    figure = go.Figure(
        [go.Bar(x=labels, y=precision, name="precision"), go.Bar(x=labels, y=recall, name="recall")]
    )
    figure.update_layout(
        title="Per-class precision and recall",
        barmode="group",
        yaxis_range=[0, 1],
        margin={"t": 40, "b": 10},
        height=360,
    )
    return figure


ORIGIN_NAMES = {"expert": "expert label", "pseudo": "pseudo-label"}


def curated_figure(counts: pd.DataFrame, original: list[int]) -> go.Figure:
    """The curated set per grade, stacked by source and origin (curated_counts rows), beside
    the original labelled set as markers."""
    figure = go.Figure()
    for (source, origin), part in counts.groupby(["source", "origin"], sort=False):
        figure.add_trace(
            go.Bar(
                x=[GRADE_NAMES[g] for g in part["grade"]],
                y=part["count"],
                name=f"{source} · {ORIGIN_NAMES[origin]}",
            )
        )
    figure.add_trace(
        go.Scatter(
            x=[GRADE_NAMES[g] for g in GRADES],
            y=original,
            mode="markers",
            marker={"symbol": "line-ew-open", "size": 40, "line": {"width": 3}, "color": "black"},
            name="original labelled set",
        )
    )
    figure.update_layout(
        barmode="stack", xaxis_title="grade", yaxis_title="images", margin={"t": 20, "b": 10}, height=360
    )
    return figure


def _reliability_trace(bins: list[dict], name: str, colour: str, largest: int) -> go.Scatter:
    return go.Scatter(
        x=[b["confidence"] for b in bins],
        y=[b["accuracy"] for b in bins],
        name=name,
        mode="lines+markers",
        line={"color": colour},
        marker={"size": [8 + 22 * (b["count"] / largest) ** 0.5 for b in bins]},
        customdata=[[b["count"], b["lo"], b["hi"]] for b in bins],
        hovertemplate="confidence %{customdata[1]:.1f}–%{customdata[2]:.1f}: "
        "%{customdata[0]} images<br>mean confidence %{x:.2f}<br>"
        "accuracy %{y:.2f}<extra>" + name + "</extra>",
    )


def reliability_figure(before: list[dict], after: list[dict]) -> go.Figure:
    """Accuracy against mean confidence per confidence bin (engine.model.calibration.reliability),
    before and after temperature scaling; a marker's area grows with its bin's images."""
    largest = max((b["count"] for b in [*before, *after]), default=1) or 1
    figure = go.Figure(
        [
            go.Scatter(
                x=[0, 1],
                y=[0, 1],
                mode="lines",
                name="perfect calibration",
                line={"color": "grey", "dash": "dot"},
                hoverinfo="skip",
            ),
            _reliability_trace(before, "before (T = 1)", COLOURS[0], largest),
            _reliability_trace(after, "after temperature scaling", COLOURS[1], largest),
        ]
    )
    figure.update_layout(
        title="Reliability on the validation set",
        xaxis_title="mean confidence",
        yaxis_title="accuracy",
        xaxis_range=[0, 1.02],
        yaxis_range=[0, 1.02],
        margin={"t": 40, "b": 10},
        height=360,
    )
    return figure
