"""Review page: reviewers accept, reject or correct the active model's confident predictions,
one image at a time, by button or key; progress, their last decisions, and the export of
the curated labels.

The queue lives in the database (db.reviews); the session keeps only the image on screen and
the images skipped, so a reload or a second browser carries on. Every decision names the
signed-in account."""

import secrets
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st
from streamlit_shortcuts import add_shortcuts

from db.queries import curated_set, sources_frame
from db.reviews import (ORDERS, RENEW_EVERY, Candidate, DecidedMeanwhile, QueueFilter,
                        RecentDecision, awaiting_second_read, claim_next, curated_csv, decide,
                        describe, double_read_share, has_predictions, held_by_others, progress,
                        recent_decisions, renew_claim, set_double_read_share, undo_last)
from db.predictions import run_grade_counts
from db.runs import active_run_id, run_calibration, run_checkpoint, run_score
from db.users import NotAllowed
from engine.export import EarlierExport, ExportRefused, export_class_folders, export_roots
from engine.images import ImageError
from engine.predictor import TTA_VIEWS
from engine.quality import threshold_accuracy
from engine.saliency import Explainer
from grades import GRADE_NAMES, GRADES, REVIEW_THRESHOLD
from views.common import (current_user, explainer, get_workspace, image_pair_ui,
                          model_quality_ui, next_step_info)

IMAGE_WIDTH = 480
THRESHOLD_HELP = ("Predictions at or above it are candidates. Review pays most where the model "
                  "is unsure: lowering it sends its less sure predictions to the reviewers too, "
                  "where unreviewed grades are wrong most often (the README's loop gain).")
# Button key -> KeyboardEvent.key values (lower case) that press it.
SHORTCUTS = {"accept": "a", "reject": "x", **{f"grade_{g}": str(g) for g in GRADES},
             "skip": " ", "undo": "backspace", "keys_help": ["?", "shift+?"], "evidence": "g"}
KEYS_HELP = """
| key | does |
|---|---|
| `a` | accept the predicted grade |
| `x` | reject the prediction |
| `0` `1` `2` `3` | correct the grade |
| `space` | skip (the image comes back at the end) |
| `backspace` | undo your last decision |
| `g` | show or hide the evidence: Grad-CAM of the predicted grade, the flip views |
| `?` | show or hide this list |
"""
# streamlit-shortcuts adds its listener from the iframe that add_shortcuts draws, once: the
# browser stops calling it when Streamlit replaces that iframe (a rerun that shifts it, as the
# keys help does; a page switch), and it listens on the whole document, so typing a folder
# name would press buttons. This listener is made in the app's own window, which outlives
# every iframe; it takes the shortcuts' listener over and passes it no key typed into a field
# (a toggle's checkbox, which `g` focuses, is no field).
KEY_GUARD = """<script>
window.parent.eval(`if (!window.__reviewKeys) {
  window.__reviewKeys = (e) => {
    const listener = window.__streamlitShortcutsListener;
    if (!listener) return;
    document.removeEventListener('keydown', listener);  // capture runs first: never twice
    if (!e.target.closest || !e.target.closest(
        'input:not([type="checkbox"]), textarea, select, [contenteditable="true"]'))
      listener(e);
  };
  document.addEventListener('keydown', window.__reviewKeys, true);
}`);
</script>"""
CHANGES = ("accept", "reject", *GRADES)  # what a past decision can be changed to
workspace = get_workspace()


# Callbacks run before the rerun that follows a click, so the next image is claimed after.

def _decide(candidate: Candidate, decision: str, grade: int | None = None) -> None:
    try:
        decide(workspace.db_url, current_user().name, candidate.image_id,
               candidate.run_id, decision, grade, seen=candidate.seen)
    except DecidedMeanwhile as exc:
        st.session_state.refusal = str(exc)
    st.session_state.current = None


def _flip_evidence() -> None:
    st.session_state.evidence_on = not st.session_state.get("evidence_on", False)


def _skip(image_id: int) -> None:
    st.session_state.skipped = [i for i in st.session_state.skipped if i != image_id] + [image_id]
    st.session_state.current = None


def _undo() -> None:
    image_id = undo_last(workspace.db_url, current_user().name)
    if image_id is None:
        st.toast("Nothing of yours to undo.")
        return
    st.session_state.current = image_id  # back on screen, to decide again
    st.session_state.skipped = [i for i in st.session_state.skipped if i != image_id]


def _set_double_read() -> None:
    set_double_read_share(workspace.db_url, st.session_state.double_read / 100)


def _toggle_keys() -> None:
    st.session_state.show_keys = not st.session_state.get("show_keys", False)


def _change(recent: RecentDecision) -> None:
    key = f"change_{recent.image_id}"
    choice = st.session_state[key]
    st.session_state[key] = None  # the row shows the new decision; the picker starts blank
    if choice is not None:  # a new row; the image on screen stays
        decision, grade = ("relabel", choice) if choice in GRADES else (choice, None)
        try:
            decide(workspace.db_url, current_user().name, recent.image_id, recent.run_id,
                   decision, grade, seen=recent.current_id)
        except DecidedMeanwhile as exc:
            st.session_state.refusal = str(exc)


def active_model_ui() -> None:
    run_id = active_run_id(workspace.db_url)
    if run_id is None:
        return  # the queue says how to get one
    name, val_qwk = run_score(workspace.db_url, run_id)
    model_quality_ui(f"Active model **{name}**", val_qwk,
                     run_grade_counts(workspace.db_url, run_id), "The active model")


def controls_ui(run_id: int) -> QueueFilter:
    threshold, grades, band, order = st.columns(4)
    chosen = threshold.slider("Confidence threshold", 0.0, 1.0, REVIEW_THRESHOLD, 0.01,
                              key="threshold", help=THRESHOLD_HELP)
    threshold.caption(threshold_accuracy(run_calibration(workspace.db_url, run_id), chosen)
                      or "No measured accuracy: the active model's calibration was not stored.")
    return QueueFilter(
        run_id,
        chosen,
        tuple(grades.multiselect("Predicted grade", GRADES, default=list(GRADES), key="grades",
                                 format_func=GRADE_NAMES.get)),
        band.slider("Confidence band", 0.0, 1.0, (0.0, 1.0), 0.01, key="band"),
        order.selectbox("Order", ORDERS, key="order"),
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
    st.slider("Read twice, blind (% of candidates)", 0, 100, step=1, key="double_read",
              on_change=_set_double_read,
              help="Chosen by image id, for every reviewer alike. Two different reviewers "
                   "read such an image without seeing each other's decision; reads that "
                   "disagree go to adjudication on the Agreement page.")


def progress_ui(queue: QueueFilter) -> bool:
    """Reviewed of total candidates, overall and per grade; False when there are none."""
    table = progress(workspace.db_url, queue.run_id, queue.threshold)
    candidates, reviewed = int(table.candidates.sum()), int(table.reviewed.sum())
    if candidates == 0:
        st.info(f"No prediction of the active model reaches the confidence threshold "
                f"{queue.threshold:.2f}: lower the threshold to get candidates.")
        return False
    waiting = int(table.read_once.sum())
    st.progress(reviewed / candidates, text=f"{reviewed} of {candidates} candidates reviewed"
                + (f"; {waiting} read once, waiting for a second reader" if waiting else ""))
    for column, (grade, row) in zip(st.columns(len(GRADES)), table.iterrows()):
        column.metric(GRADE_NAMES[grade], f"{row.reviewed} / {row.candidates}")
    return True


def card_ui(candidate: Candidate) -> None:
    st.subheader(candidate.name)
    st.caption(f"Source {candidate.source} · predicted {GRADE_NAMES[candidate.grade]} · "
               f"confidence {candidate.confidence:.2f}")
    shown = st.session_state.get("evidence_on", False)
    st.button(f"{'Hide' if shown else 'Show'} evidence `g`", key="evidence",
              on_click=_flip_evidence,
              help="Where the model saw its grade (Grad-CAM), and how it grades the image and "
                   "its mirror image.")
    model = explainer(run_checkpoint(workspace.db_url, candidate.run_id)) if shown else None
    image_pair_ui(candidate.path, candidate.name, width=IMAGE_WIDTH, fill=True,
                  explain=(model, candidate.grade) if model else None)
    figure = px.bar(x=[GRADE_NAMES[g] for g in GRADES], y=candidate.probs, range_y=[0, 1],
                    text_auto=".2f", labels={"x": "grade", "y": "probability"}, height=280)
    st.plotly_chart(figure, key="probabilities")
    if model:
        flip_views_ui(model, candidate.path)


def flip_views_ui(model: Explainer, path: str) -> None:
    """The probabilities of each test-time view of the image side by side: the spread that
    TTA averages away."""
    try:
        views = model.views(Path(path))
    except ImageError:
        return  # the image row has said why
    names = TTA_VIEWS[len(views)]
    frame = pd.DataFrame({"grade": [GRADE_NAMES[g] for g in GRADES] * len(names),
                          "view": [v for v in names for _ in GRADES],
                          "probability": views.ravel()})
    figure = px.bar(frame, x="grade", y="probability", color="view", barmode="group",
                    range_y=[0, 1], text_auto=".2f" if len(names) <= 2 else False,
                    height=240, title="Test-time views")
    st.plotly_chart(figure, key="flip_views")


@st.fragment(run_every=RENEW_EVERY)
def hold_ui(candidate: Candidate) -> None:
    """Keeps the image on screen claimed while the reviewer looks at it, clicks or not."""
    if not renew_claim(workspace.db_url, current_user().name, candidate.image_id,
                       candidate.seen):
        st.session_state.refusal = (f"{candidate.name} was decided or taken over meanwhile, "
                                    "by another reviewer or in another tab; here is the next "
                                    "image.")
        st.rerun()


def decision_buttons_ui(candidate: Candidate) -> None:
    accept, reject, skip = st.columns(3)
    accept.button(f"Accept grade {candidate.grade} `a`", key="accept", type="primary",
                  on_click=_decide, args=(candidate, "accept"), width="stretch")
    reject.button("Reject `x`", key="reject", on_click=_decide, args=(candidate, "reject"),
                  width="stretch")
    skip.button("Skip `space`", key="skip", on_click=_skip, args=(candidate.image_id,),
                width="stretch")
    for column, grade in zip(st.columns(len(GRADES)), GRADES):
        column.button(f"Grade {grade} `{grade}`", key=f"grade_{grade}", on_click=_decide,
                      args=(candidate, "relabel", grade), width="stretch")


def keys_ui() -> None:
    undo, keys = st.columns(2)
    undo.button("Undo my last decision `backspace`", key="undo", on_click=_undo)
    keys.button("Keys `?`", key="keys_help", on_click=_toggle_keys)
    if st.session_state.get("show_keys"):
        st.markdown(KEYS_HELP)
    # The script draws nothing: "content" would measure 0 px and fall back to a blank 150 px.
    st.iframe(KEY_GUARD, height=1)
    add_shortcuts(**SHORTCUTS)


def queue_ui(reviewer: str) -> None:
    run_id = active_run_id(workspace.db_url)
    if run_id is None:
        next_step_info("No model yet: train one on the Retrain page, then run inference on "
                       "the Inference page first.", "No model yet: the queue fills once an "
                       "admin has trained a model and run it over a pool of images.")
        return
    if not has_predictions(workspace.db_url, run_id):
        next_step_info("The active model has no predictions yet: run inference on the "
                       "Inference page first.", "The active model has no predictions yet: the "
                       "queue fills once an admin has run it over a pool of images.")
        return
    queue = controls_ui(run_id)
    double_read_ui()
    if not queue.grades:
        st.info("Choose at least one predicted grade to review.")
        return
    if not progress_ui(queue):
        return
    if "refusal" in st.session_state:
        st.warning(st.session_state.pop("refusal"))
    candidate = claim_next(workspace.db_url, reviewer, queue,
                           st.session_state.setdefault("skipped", []),
                           st.session_state.get("current"))
    st.session_state.current = None if candidate is None else candidate.image_id
    if candidate is None:
        empty_queue_ui(reviewer, queue)
    else:
        card_ui(candidate)
        hold_ui(candidate)
        decision_buttons_ui(candidate)
    keys_ui()


def empty_queue_ui(reviewer: str, queue: QueueFilter) -> None:
    held = held_by_others(workspace.db_url, reviewer, queue)
    waiting = awaiting_second_read(workspace.db_url, reviewer, queue)
    if held:
        st.info(f"Nothing left for you right now: the remaining {held} candidate(s) with these "
                "filters are being reviewed by others.")
    elif waiting:
        st.success(f"Queue finished for you: {waiting} image(s) you read wait for a second "
                   "reviewer's blind read.")
    else:
        st.success("Queue finished: every candidate with these filters has a decision.")


def recent_ui(reviewer: str) -> None:
    st.subheader("Your last decisions")
    recent = recent_decisions(workspace.db_url, reviewer)
    if not recent:
        st.caption("None yet.")
    for item in recent:
        since = "" if item.is_current else (
            " (since undone)" if item.current_decision == "undo" else
            f" (since {describe(item.current_decision, item.current_grade)} by "
            f"{item.current_reviewer})")
        text, change = st.columns([3, 1])
        text.write(f"{item.time:%Y-%m-%d %H:%M} UTC · **{item.name}** · "
                   f"{describe(item.decision, item.grade)}{since}")
        change.selectbox("Change to", CHANGES, index=None, key=f"change_{item.image_id}",
                         placeholder="change to…", label_visibility="collapsed",
                         format_func=lambda c: f"grade {c}" if c in GRADES else c,
                         on_change=_change, args=(item,))


def export_ui() -> None:
    st.subheader("Export the curated labels")
    st.caption("Expert labels of the training sources, and the pseudo-labels whose current "
               "decision is an accept, a correction or an adjudicated grade, as in training.")
    st.download_button("Download as CSV", lambda: curated_csv(workspace.db_url),
                       file_name="curated_labels.csv", mime="text/csv", key="export_csv")
    target = st.text_input("Class folders 0-3 into", key="export_folder",
                           value=str(workspace.root / "export" / "curated"))
    replace = st.checkbox("Replace an earlier export in this folder (only the files it wrote)",
                          key="export_replace")
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
        result = export_class_folders(zip(curated.path.tolist(), curated.grade.tolist()),
                                      out, replace, sources_frame(workspace.db_url).root,
                                      user=current_user(), roots=export_roots(workspace.root))
    except EarlierExport as exc:
        st.error(f"{exc}: tick “Replace an earlier export” or choose another folder.")
        return
    except (ExportRefused, NotAllowed) as exc:
        st.error(f"{exc}.")
        return
    except OSError as exc:
        st.error(f"Cannot write into {out}: {exc.strerror or exc}.")
        return
    st.success(f"Wrote {result.written} files into {out}/0-3.")
    if result.missing:
        st.warning(f"{len(result.missing)} files could not be read and were left out: "
                   + ", ".join(result.missing[:5]) + ("…" if len(result.missing) > 5 else ""))


st.title("Review")
active_model_ui()
reviewer = current_user().name
st.caption(f"Reviewing as **{reviewer}**: every decision is stored with this account.")
queue_ui(reviewer)
recent_ui(reviewer)
if current_user().is_admin:
    export_ui()
