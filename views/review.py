"""Review page: reviewers accept, reject or correct the active model's confident predictions,
one image at a time, by button or key; progress, their last decisions, and the export of
the curated labels.

The queue lives in the database (db.reviews); the session keeps only the image on screen and
the images skipped, so a reload or a second browser carries on. Every decision names the
signed-in account."""

import secrets
import time
from functools import lru_cache
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from db.predictions import run_grade_counts
from db.queries import curated_set, sources_frame
from db.reviews import (
    ORDERS,
    RENEW_EVERY,
    Candidate,
    DecidedMeanwhile,
    QueueFilter,
    RecentDecision,
    awaiting_second_read,
    claim_next,
    curated_csv,
    decide,
    describe,
    double_read_share,
    has_predictions,
    held_by_others,
    progress,
    recent_decisions,
    renew_claim,
    set_double_read_share,
    undo_last,
    upcoming,
)
from db.runs import active_run_id, run_calibration, run_checkpoint, run_score
from db.users import NotAllowed
from engine.data.export import EarlierExport, ExportRefused, export_class_folders, export_roots
from engine.data.images import ImageError
from engine.model.predictor import TTA_VIEWS
from engine.model.quality import threshold_accuracy
from engine.model.saliency import Explainer
from engine.runtime.markdown import literal
from grades import GRADE_NAMES, GRADES, REVIEW_THRESHOLD
from views.common import current_user, explainer, get_workspace, model_quality_ui, next_step_info
from views.pace import time_left_text
from views.viewer import KEYS as VIEWER_KEYS
from views.viewer import grading_viewer, prefetch

THRESHOLD_HELP = (
    "Predictions at or above it are candidates. Review pays most where the model "
    "is unsure: lowering it sends its less sure predictions to the reviewers too, "
    "where unreviewed grades are wrong most often (the README's loop gain)."
)
# Streamlit's own shortcuts (st.button(shortcut=...)) ignore keys typed into fields; they take
# no punctuation, so the keys list is on `h`, not `?`.
KEYS_HELP = (
    """
| key | does |
|---|---|
| `a` | accept the predicted grade |
| `x` | reject the prediction |
| `0` `1` `2` `3` | correct the grade |
| `space` | skip (the image comes back at the end) |
| `backspace` | undo your last decision |
| `g` | show or hide the evidence: Grad-CAM of the predicted grade, the flip views |
| `h` | show or hide this list |
""".rstrip("\n")
    + VIEWER_KEYS.split("|---|---|", 1)[1]
)
CHANGES = ("accept", "reject", *GRADES)  # what a past decision can be changed to
workspace = get_workspace()


# Callbacks run before the rerun that follows a click, so the next image is claimed after.
# A card's buttons have keys that name its image: a second press that reaches the server after
# the next card was drawn belongs to a button that is gone, so Streamlit drops it, or, when the
# run that drew the next card was cut short, calls it with the card it was made on, which
# `_on_card` then refuses. With one key for every card it would decide the next image unseen.


def _on_card(image_id: int) -> bool:
    """Whether the image is the card on screen (not one already decided or skipped)."""
    return st.session_state.get("current") == image_id


def _on_screen(image_id: int) -> float | None:
    """Seconds since the image's card was first drawn in this session."""
    shown_id, since = st.session_state.get("shown_since", (None, 0.0))
    return time.monotonic() - since if shown_id == image_id else None


def _decide(candidate: Candidate, decision: str, grade: int | None = None) -> None:
    if not _on_card(candidate.image_id):
        return
    try:
        decide(
            workspace.db_url,
            current_user().name,
            candidate.image_id,
            candidate.run_id,
            decision,
            grade,
            seen=candidate.seen,
            seconds=_on_screen(candidate.image_id),
        )
    except DecidedMeanwhile as exc:
        st.session_state.refusal = str(exc)
    st.session_state.current = None


def _flip_evidence() -> None:
    st.session_state.evidence_on = not st.session_state.get("evidence_on", False)


def _skip(image_id: int) -> None:
    if not _on_card(image_id):
        return
    st.session_state.skipped = [i for i in st.session_state.skipped if i != image_id] + [image_id]
    st.session_state.current = None


def _undo() -> None:
    try:
        image_id = undo_last(workspace.db_url, current_user().name)
    except DecidedMeanwhile as exc:  # a read that is settled: both reads in, or adjudicated
        st.session_state.refusal = str(exc)
        return
    if image_id is None:
        st.toast("Nothing of yours to undo.")
        return
    st.session_state.current = image_id  # back on screen, to decide again
    st.session_state.skipped = [i for i in st.session_state.skipped if i != image_id]


def _set_double_read() -> None:
    try:
        set_double_read_share(workspace.db_url, st.session_state.double_read / 100, user=current_user())
    except NotAllowed as exc:
        st.session_state.refusal = f"{exc}."


def _toggle_keys() -> None:
    st.session_state.show_keys = not st.session_state.get("show_keys", False)


def _change(recent: RecentDecision) -> None:
    key = f"change_{recent.image_id}"
    choice = st.session_state[key]
    st.session_state[key] = None  # the row shows the new decision; the picker starts blank
    if choice is not None:  # a new row; the image on screen stays
        decision, grade = ("relabel", choice) if choice in GRADES else (choice, None)
        try:
            decide(
                workspace.db_url,
                current_user().name,
                recent.image_id,
                recent.run_id,
                decision,
                grade,
                seen=recent.current_id,
            )
        except DecidedMeanwhile as exc:
            st.session_state.refusal = str(exc)


def active_model_ui() -> None:
    run_id = active_run_id(workspace.db_url)
    if run_id is None:
        return  # the queue says how to get one
    name, val_qwk = run_score(workspace.db_url, run_id)
    model_quality_ui(
        f"Active model **{literal(name)}**",
        val_qwk,
        run_grade_counts(workspace.db_url, run_id),
        "The active model",
    )


def controls_ui(run_id: int) -> QueueFilter:
    chosen = st.slider(
        "Confidence threshold", 0.0, 1.0, REVIEW_THRESHOLD, 0.01, key="threshold", help=THRESHOLD_HELP
    )
    st.caption(
        threshold_accuracy(run_calibration(workspace.db_url, run_id), chosen)
        or "No measured accuracy: the active model's calibration was not stored."
    )
    return QueueFilter(
        run_id,
        chosen,
        tuple(
            st.multiselect(
                "Predicted grade",
                GRADES,
                default=list(GRADES),
                key="grades",
                format_func=GRADE_NAMES.__getitem__,
            )
        ),
        st.slider("Confidence band", 0.0, 1.0, (0.0, 1.0), 0.01, key="band"),
        st.selectbox("Order", ORDERS, key="order"),
        st.session_state.setdefault("review_seed", secrets.randbelow(2**31)),
    )


def double_read_ui() -> None:
    """The share read blind by two reviewers: stored in the database, so the slider shows
    what any admin set last; reviewers see it."""
    share = double_read_share(workspace.db_url)
    if not current_user().is_admin:
        st.caption(f"{share:.0%} of the candidates are read blind by two reviewers.")
        return
    st.session_state.double_read = round(share * 100)
    st.slider(
        "Read twice, blind (% of candidates)",
        0,
        100,
        step=1,
        key="double_read",
        on_change=_set_double_read,
        help="Chosen by image id, for every reviewer alike. Two different reviewers "
        "read such an image without seeing each other's decision; reads that "
        "disagree go to adjudication on the Agreement page.",
    )


def settings_ui(run_id: int) -> QueueFilter:
    """The queue's settings, folded away so that the card comes first."""
    with st.popover("Queue settings", icon=":material/tune:"):
        queue = controls_ui(run_id)
        double_read_ui()
    return queue


def progress_ui(queue: QueueFilter) -> bool:
    """Reviewed of total candidates and per grade in one line, and the time left; False when
    there are none."""
    table = progress(workspace.db_url, queue.run_id, queue.threshold)
    candidates, reviewed = int(table.candidates.sum()), int(table.reviewed.sum())
    if candidates == 0:
        st.info(
            f"No prediction of the active model reaches the confidence threshold "
            f"{queue.threshold:.2f}: lower the threshold to get candidates."
        )
        return False
    waiting = int(table.read_once.sum())
    per_grade = " · ".join(
        f"{GRADE_NAMES[grade]} {row.reviewed}/{row.candidates}" for grade, row in table.iterrows()
    )
    st.progress(
        reviewed / candidates,
        text=f"{reviewed} of {candidates} candidates reviewed"
        + (f"; {waiting} read once, waiting for a second reader" if waiting else "")
        + f" · {per_grade}",
    )
    # A double-read image needs two decisions: one more for those read once.
    unread = candidates - reviewed - waiting
    pace = time_left_text(
        workspace.db_url, round(unread * (1 + double_read_share(workspace.db_url))) + waiting
    )
    if pace:
        st.caption(pace)
    return True


def card_ui(candidate: Candidate, upcoming: str | None) -> None:
    """The photograph in the viewer, most of the width; beside it what the model says and
    the buttons."""
    if st.session_state.get("shown_since", (None,))[0] != candidate.image_id:
        st.session_state.shown_since = (candidate.image_id, time.monotonic())
    photo, side = st.columns([3, 1])
    with photo:
        grading_viewer(
            candidate.path,
            candidate.run_id,
            candidate.grade if st.session_state.get("evidence_on") else None,
            decides=True,
            upcoming=upcoming,
        )
    with side:
        st.subheader(literal(candidate.name))
        st.caption(
            f"Source {literal(candidate.source)} · predicted "
            f"{GRADE_NAMES[candidate.grade]} · confidence {candidate.confidence:.2f}"
        )
        decision_buttons_ui(candidate)
        st.plotly_chart(probability_figure(candidate.probs), key="probabilities")
        if st.session_state.get("evidence_on"):
            model = explainer(run_checkpoint(workspace.db_url, candidate.run_id))
            if model:
                flip_views_ui(model, candidate.path)


@lru_cache(maxsize=64)
def probability_figure(probs: tuple[float, ...]) -> go.Figure:
    """The four probabilities as bars; plotly's graph objects, and kept: plotly express took a
    third of the time between a decision and the next card."""
    figure = go.Figure(go.Bar(x=list(GRADES), y=probs, text=[f"{p:.2f}" for p in probs]))
    figure.update_layout(
        height=200,
        margin={"l": 0, "r": 0, "t": 10, "b": 0},
        xaxis={"title": "grade", "tickvals": list(GRADES)},
        yaxis={"title": "probability", "range": [0, 1]},
    )
    return figure


def flip_views_ui(model: Explainer, path: str) -> None:
    """The probabilities of each test-time view of the image side by side: the spread that
    TTA averages away."""
    try:
        views = model.views(Path(path))
    except ImageError:
        return  # the image row has said why
    names = TTA_VIEWS[len(views)]
    frame = pd.DataFrame(
        {
            "grade": list(GRADES) * len(names),
            "view": [v for v in names for _ in GRADES],
            "probability": views.ravel(),
        }
    )
    figure = px.bar(
        frame,
        x="grade",
        y="probability",
        color="view",
        barmode="group",
        range_y=[0, 1],
        height=260,
        title="Test-time views",
    )
    figure.update_layout(
        margin={"l": 0, "r": 0, "t": 30, "b": 0}, legend={"orientation": "h", "y": -0.35, "title": None}
    )
    st.plotly_chart(figure, key="flip_views")


@st.fragment(run_every=RENEW_EVERY)
def hold_ui(candidate: Candidate) -> None:
    """Keeps the image on screen claimed while the reviewer looks at it, clicks or not."""
    if not renew_claim(workspace.db_url, current_user().name, candidate.image_id, candidate.seen):
        st.session_state.refusal = (
            f"{candidate.name} was decided or taken over meanwhile, "
            "by another reviewer or in another tab; here is the next "
            "image."
        )
        st.rerun()


def decision_buttons_ui(candidate: Candidate) -> None:
    st.button(
        f"Accept grade {candidate.grade}",
        key=f"accept_{candidate.image_id}",
        type="primary",
        shortcut="a",
        on_click=_decide,
        args=(candidate, "accept"),
        width="stretch",
    )
    st.button(
        "Reject",
        key=f"reject_{candidate.image_id}",
        shortcut="x",
        on_click=_decide,
        args=(candidate, "reject"),
        width="stretch",
    )
    for column, grade in zip(st.columns(2) + st.columns(2), GRADES, strict=True):
        column.button(
            f"Grade {grade}",
            key=f"grade_{grade}_{candidate.image_id}",
            shortcut=str(grade),
            on_click=_decide,
            args=(candidate, "relabel", grade),
            width="stretch",
            help=f"Correct the grade to {GRADE_NAMES[grade]}",
        )
    st.button(
        "Skip",
        key=f"skip_{candidate.image_id}",
        shortcut="space",
        on_click=_skip,
        args=(candidate.image_id,),
        width="stretch",
        help="The image comes back at the end of your queue",
    )
    shown = st.session_state.get("evidence_on", False)
    st.button(
        f"{'Hide' if shown else 'Show'} evidence",
        key="evidence",
        shortcut="g",
        on_click=_flip_evidence,
        width="stretch",
        help="Where the model saw its grade (Grad-CAM, a view of the photograph), and "
        "how it grades the image and its mirror image.",
    )


def keys_ui() -> None:
    undo, keys = st.columns(2)
    undo.button("Undo my last decision", key="undo", shortcut="backspace", on_click=_undo)
    keys.button("Keys", key="keys_help", shortcut="h", on_click=_toggle_keys)
    if st.session_state.get("show_keys"):
        st.markdown(KEYS_HELP)


def queue_ui(reviewer: str) -> None:
    run_id = active_run_id(workspace.db_url)
    if run_id is None:
        next_step_info(
            "No model yet: train one on the Retrain page, then run inference on the Inference page first.",
            "No model yet: the queue fills once an "
            "admin has trained a model and run it over a pool of images.",
        )
        return
    if not has_predictions(workspace.db_url, run_id):
        next_step_info(
            "The active model has no predictions yet: run inference on the Inference page first.",
            "The active model has no predictions yet: the "
            "queue fills once an admin has run it over a pool of images.",
        )
        return
    bar, settings = st.columns([5, 1], vertical_alignment="center")
    with settings:
        queue = settings_ui(run_id)
    if not queue.grades:
        st.info("Choose at least one predicted grade to review (Queue settings).")
        return
    with bar:
        if not progress_ui(queue):
            return
    if "refusal" in st.session_state:
        st.warning(literal(st.session_state.pop("refusal")))
    skipped = st.session_state.setdefault("skipped", [])
    candidate = claim_next(workspace.db_url, reviewer, queue, skipped, st.session_state.get("current"))
    st.session_state.current = None if candidate is None else candidate.image_id
    if candidate is None:
        empty_queue_ui(reviewer, queue)
    else:
        following = upcoming(workspace.db_url, reviewer, queue, skipped, candidate.image_id)
        prefetch(following, candidate.run_id)
        card_ui(candidate, following)
        hold_ui(candidate)
    keys_ui()


def empty_queue_ui(reviewer: str, queue: QueueFilter) -> None:
    held = held_by_others(workspace.db_url, reviewer, queue)
    waiting = awaiting_second_read(workspace.db_url, reviewer, queue)
    if held:
        st.info(
            f"Nothing left for you right now: the remaining {held} candidate(s) with these "
            "filters are being reviewed by others."
        )
    elif waiting:
        st.success(
            f"Queue finished for you: {waiting} image(s) you read wait for a second reviewer's blind read."
        )
    else:
        st.success("Queue finished: every candidate with these filters has a decision.")


def recent_ui(reviewer: str) -> None:
    st.subheader("Your last decisions")
    recent = recent_decisions(workspace.db_url, reviewer)
    if not recent:
        st.caption("None yet.")
    for item in recent:
        since = (
            ""
            if item.is_current
            else (
                " (since undone)"
                if item.current_decision == "undo"
                else f" (since {describe(item.current_decision, item.current_grade)} by "
                f"{literal(item.current_reviewer)})"
            )
        )
        text, change = st.columns([3, 1])
        text.write(
            f"{item.time:%Y-%m-%d %H:%M} UTC · **{literal(item.name)}** · "
            f"{describe(item.decision, item.grade)}{since}"
        )
        if item.settled:
            change.caption("settled", help="Adjudicated, or both blind reads are in: it stays as it is.")
            continue
        change.selectbox(
            "Change to",
            CHANGES,
            index=None,
            key=f"change_{item.image_id}",
            placeholder="change to…",
            label_visibility="collapsed",
            format_func=lambda c: f"grade {c}" if c in GRADES else c,
            on_change=_change,
            args=(item,),
        )


def export_ui() -> None:
    st.subheader("Export the curated labels")
    st.caption(
        "Expert labels of the training sources, and the pseudo-labels whose current "
        "decision is an accept, a correction or an adjudicated grade, as in training."
    )
    st.download_button(
        "Download as CSV",
        lambda: curated_csv(workspace.db_url),
        file_name="curated_labels.csv",
        mime="text/csv",
        key="export_csv",
    )
    target = st.text_input(
        "Class folders 0-3 into", key="export_folder", value=str(workspace.root / "export" / "curated")
    )
    replace = st.checkbox(
        "Replace an earlier export in this folder (only the files it wrote)", key="export_replace"
    )
    if st.button("Write class folders", key="export_folders"):
        write_folders_ui(target.strip(), replace)


def write_folders_ui(target: str, replace: bool) -> None:
    if not target:
        st.error("Enter the folder to write the class folders into.")
        return
    curated = curated_set(workspace.db_url)
    if curated.empty:
        st.info("Nothing curated yet: import labelled data or accept some predictions.")
        return
    out = Path(target).expanduser()
    try:
        result = export_class_folders(
            zip(curated.path.tolist(), curated.grade.tolist(), strict=True),
            out,
            replace,
            sources_frame(workspace.db_url).root,
            db_url=workspace.db_url,
            user=current_user(),
            roots=export_roots(workspace.root),
        )
    except EarlierExport as exc:
        st.error(f"{literal(exc)}: tick “Replace an earlier export” or choose another folder.")
        return
    except (ExportRefused, NotAllowed) as exc:
        st.error(f"{literal(exc)}.")
        return
    except OSError as exc:
        st.error(f"Cannot write into {literal(out)}: {literal(exc.strerror or exc)}.")
        return
    st.success(f"Wrote {result.written} files into {literal(out)}/0-3.")
    if result.missing:
        st.warning(
            f"{len(result.missing)} files could not be read and were left out: "
            + literal(", ".join(result.missing[:5]))
            + ("…" if len(result.missing) > 5 else "")
        )


@st.fragment
def review_ui(reviewer: str) -> None:
    """The queue and the reviewer's last decisions: a decision reruns only these, not the
    sidebar and the rest of the page, so the next card comes sooner."""
    queue_ui(reviewer)
    recent_ui(reviewer)


reviewer = current_user().name
st.title("Review")
active_model_ui()  # and its warnings: reasons not to trust its grades stay in sight
st.caption(f"Reviewing as **{literal(reviewer)}**: every decision is stored with this account.")
review_ui(reviewer)
if current_user().is_admin:
    export_ui()
