"""The review queue, decisions, claims and export (db.reviews, engine.data.export), and the Review
page run headless with AppTest on a small workspace whose predictions are set by hand."""

import io
import json
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from conftest import BOTH_BACKENDS, CALIBRATION, open_page, page_text, tiny_checkpoint, write_image
from sqlalchemy import select, update
from streamlit.testing.v1 import AppTest

import db.reviews as db_reviews
from db.queries import curated_set
from db.reviews import (
    CLAIM_TTL,
    DecidedMeanwhile,
    QueueFilter,
    claim_next,
    curated_csv,
    decide,
    held_by_others,
    loop_overview,
    progress,
    recent_decisions,
    renew_claim,
    undo_last,
)
from db.schema import Claim, Image, Prediction, Review, Run, Source, utcnow
from db.session import session_scope
from db.users import TERMINAL
from engine.data.export import MANIFEST, EarlierExport, ExportRefused, export_class_folders
from engine.data.sources import import_source
from engine.model.infer import register_model
from engine.runtime.markdown import literal
from engine.runtime.workspace import Workspace
from grades import REVIEW_THRESHOLD

# The pool's eight images get these (confidence, predicted grade), in import order: six reach
# the default threshold 0.70; least confident first they come as pool images 5, 4, 3, 2, 1, 0.
# The engine's export tests are not about where an export may write, nor who may (test_roles.py
# is): they export as the terminal, which opens no database.
ANYWHERE = {"db_url": None, "user": TERMINAL, "roots": [Path("/")]}
POOL = [(0.95, 0), (0.90, 1), (0.85, 2), (0.80, 3), (0.75, 0), (0.72, 1), (0.60, 2), (0.50, 3)]


def register_run(workspace: Workspace) -> int:
    checkpoint = tiny_checkpoint(workspace.weights / "tiny.pth")
    return register_model(
        workspace.db_url, checkpoint, {"model_name": "test_efficientnet", "image_size": 64, "run": "tiny"}
    )


def add_predictions(db_url: str, run_id: int, image_ids: list[int], scores: list[tuple[float, int]]) -> None:
    with session_scope(db_url) as session:
        for image_id, (confidence, grade) in zip(image_ids, scores, strict=True):
            probs = [(1 - confidence) / 3] * 4
            probs[grade] = confidence
            session.add(
                Prediction(
                    run_id=run_id,
                    image_id=image_id,
                    p0=probs[0],
                    p1=probs[1],
                    p2=probs[2],
                    p3=probs[3],
                    grade=grade,
                    confidence=confidence,
                )
            )


def image_ids(db_url: str, source: str) -> list[int]:
    with session_scope(db_url) as session:
        return list(
            session.scalars(select(Image.id).join(Source).where(Source.name == source).order_by(Image.id))
        )


@pytest.fixture
def predicted(workspace: Workspace, tiny_data: Path) -> tuple[Workspace, int, list[int]]:
    """Pool, validation and train sources; a run whose predictions are POOL on the pool and a
    very confident one on two validation images, which must never be reviewed."""
    db = workspace.db_url
    import_source(db, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    import_source(db, "folders", tiny_data / "validation", "validation", "validation")
    import_source(db, "aptos", tiny_data / "aptos", "train", "train")
    run_id = register_run(workspace)
    pool = image_ids(db, "pool")
    add_predictions(db, run_id, pool, POOL)
    add_predictions(db, run_id, image_ids(db, "validation")[:2], [(0.99, 0), (0.98, 3)])
    return workspace, run_id, pool


def order(db_url: str, queue: QueueFilter, reviewer: str = "ana") -> list[int]:
    """The queue as one reviewer walks it by skipping every image."""
    seen: list[int] = []
    while (candidate := claim_next(db_url, reviewer, queue, skip=seen)) and candidate.image_id not in seen:
        seen.append(candidate.image_id)
    return seen


def reviews(db_url: str) -> list[tuple]:
    with session_scope(db_url) as session:
        return [
            tuple(row)
            for row in session.execute(
                select(
                    Review.image_id, Review.decision, Review.grade, Review.reviewer, Review.run_id
                ).order_by(Review.id)
            )
        ]


# The queue and its filters


@BOTH_BACKENDS
def test_threshold_filters_and_orders_shape_the_queue(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    queue = QueueFilter(run_id)
    # Not the validation images, however confident.
    assert order(db, queue) == [pool[5], pool[4], pool[3], pool[2], pool[1], pool[0]]
    assert order(db, QueueFilter(run_id, threshold=0.8)) == [pool[3], pool[2], pool[1], pool[0]]
    assert order(db, QueueFilter(run_id, threshold=0.5)) == pool[::-1]
    assert order(db, QueueFilter(run_id, grades=(0, 3))) == [pool[4], pool[3], pool[0]]
    assert order(db, QueueFilter(run_id, band=(0.74, 0.86))) == [pool[4], pool[3], pool[2]]
    assert order(db, QueueFilter(run_id, order="most confident first")) == pool[:6]
    assert order(db, QueueFilter(run_id, order="by grade")) == [
        pool[4],
        pool[0],
        pool[5],
        pool[1],
        pool[2],
        pool[3],
    ]
    shuffled = [order(db, QueueFilter(run_id, order="random", seed=s)) for s in range(4)]
    assert all(sorted(s) == sorted(pool[:6]) for s in shuffled)
    assert order(db, QueueFilter(run_id, order="random", seed=2)) == shuffled[2]  # stable
    assert len({tuple(s) for s in shuffled}) > 1


@BOTH_BACKENDS
def test_decisions_are_appended_and_leave_the_queue(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    decide(db, "ana", pool[5], run_id, "accept")
    decide(db, "ana", pool[4], run_id, "relabel", 2)
    decide(db, "ana", pool[3], run_id, "reject")
    assert reviews(db) == [
        (pool[5], "accept", 1, "ana", run_id),
        (pool[4], "relabel", 2, "ana", run_id),
        (pool[3], "reject", None, "ana", run_id),
    ]
    queue = QueueFilter(run_id)
    assert order(db, queue) == [pool[2], pool[1], pool[0]]
    table = progress(db, run_id, 0.70)
    assert table.to_dict("index") == {
        0: {"candidates": 2, "reviewed": 1, "read_once": 0},
        1: {"candidates": 2, "reviewed": 1, "read_once": 0},
        2: {"candidates": 1, "reviewed": 0, "read_once": 0},
        3: {"candidates": 1, "reviewed": 1, "read_once": 0},
    }
    with pytest.raises(ValueError, match="grade 0-3"):
        decide(db, "ana", pool[2], run_id, "relabel", 4)
    with pytest.raises(ValueError, match="no prediction"):
        decide(db, "ana", pool[7] + 1000, run_id, "accept")


@BOTH_BACKENDS
def test_undo_takes_back_only_the_reviewers_own_current_decisions(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    decide(db, "ana", pool[5], run_id, "accept")
    review_id = decide(db, "ana", pool[4], run_id, "reject")
    decide(db, "ben", pool[4], run_id, "relabel", 3, seen=review_id)  # ben changed ana's
    decide(db, "ben", pool[3], run_id, "accept")
    assert undo_last(db, "ana") == pool[5]
    assert reviews(db)[-1] == (pool[5], "undo", None, "ana", run_id)
    assert order(db, QueueFilter(run_id))[0] == pool[5]  # back in the queue
    assert undo_last(db, "ana") is None  # ben's decisions are not ana's to undo
    assert undo_last(db, "ben") == pool[3]
    assert undo_last(db, "ben") == pool[4]
    assert reviews(db)[-2:] == [
        (pool[3], "undo", None, "ben", run_id),
        (pool[4], "undo", None, "ben", run_id),
    ]
    assert undo_last(db, "nobody") is None


def age_claims(db_url: str, reviewer: str, age: timedelta) -> None:
    with session_scope(db_url) as session:
        session.execute(update(Claim).where(Claim.reviewer == reviewer).values(claimed_at=utcnow() - age))


@BOTH_BACKENDS
def test_claims_keep_two_reviewers_apart_to_the_last_image(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    queue = QueueFilter(run_id)
    assert claim_next(db, "ana", queue).image_id == pool[5]
    assert claim_next(db, "ben", queue).image_id == pool[4]
    assert claim_next(db, "ana", queue, keep=pool[5]).image_id == pool[5]  # a rerun keeps it
    assert claim_next(db, "ben", queue, keep=pool[5]).image_id == pool[4]  # not ana's
    age_claims(db, "ana", CLAIM_TTL + timedelta(minutes=1))  # ana's tab was closed long ago
    assert claim_next(db, "ben", queue, skip=[pool[4]]).image_id == pool[5]
    for image_id in pool[:5]:
        decide(db, "cid", image_id, run_id, "accept")
    with session_scope(db) as session:
        assert session.scalar(select(Claim.reviewer).where(Claim.image_id == pool[4])) is None
    assert claim_next(db, "ana", queue) is None  # ben holds the last one: it is not shared
    assert held_by_others(db, "ana", queue) == 1 and held_by_others(db, "ben", queue) == 0
    assert claim_next(db, "ben", queue, keep=pool[5]).image_id == pool[5]
    decide(db, "ben", pool[5], run_id, "reject")
    assert claim_next(db, "ana", queue) is None and held_by_others(db, "ana", queue) == 0
    with session_scope(db) as session:
        assert session.scalars(select(Claim)).all() == []


@BOTH_BACKENDS
def test_a_claim_lapses_by_the_clock_of_each_query_not_of_the_first(predicted, monkeypatch):
    """The queue's statements are made once and kept (db.reviews._free): the time that says
    whether a claim is live must be read at each run, not frozen at the first."""
    workspace, run_id, pool = predicted
    db = workspace.db_url
    queue = QueueFilter(run_id)
    assert claim_next(db, "ana", queue).image_id == pool[5]
    assert claim_next(db, "ben", queue).image_id == pool[4]  # the statements exist now
    later = utcnow() + CLAIM_TTL + timedelta(minutes=1)
    monkeypatch.setattr(db_reviews, "utcnow", lambda: later)  # ana's tab slept since
    assert claim_next(db, "ben", queue, skip=[pool[4]]).image_id == pool[5]


@BOTH_BACKENDS
def test_an_open_card_renews_its_claim(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    queue = QueueFilter(run_id)
    shown = claim_next(db, "ana", queue)
    age_claims(db, "ana", CLAIM_TTL - timedelta(seconds=10))  # looking for almost 5 minutes
    assert renew_claim(db, "ana", shown.image_id, shown.seen)
    age_claims(db, "ana", timedelta(minutes=1))  # the card is still open, renewed since
    assert claim_next(db, "ben", queue).image_id != shown.image_id
    age_claims(db, "ana", CLAIM_TTL + timedelta(minutes=1))  # a tab asleep: the claim lapsed
    taken = claim_next(db, "ben", queue, skip=[pool[4]])
    assert taken.image_id == shown.image_id
    assert not renew_claim(db, "ana", shown.image_id, shown.seen)  # ben holds it now
    decide(db, "ben", taken.image_id, run_id, "accept")
    age_claims(db, "ben", CLAIM_TTL + timedelta(minutes=1))
    assert not renew_claim(db, "ana", shown.image_id, shown.seen)  # decided meanwhile


@BOTH_BACKENDS
def test_a_decision_after_someone_elses_is_refused_in_words(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    queue = QueueFilter(run_id)
    first_tab = claim_next(db, "ana", queue)
    second_tab = claim_next(db, "ana", queue)  # the same reviewer's other tab: the same image
    assert second_tab.image_id == first_tab.image_id and first_tab.seen is None
    decide(db, "ana", first_tab.image_id, run_id, "accept", seen=first_tab.seen)
    with pytest.raises(DecidedMeanwhile, match="by you, in another tab or window"):
        decide(db, "ana", second_tab.image_id, run_id, "reject", seen=second_tab.seen)
    undo_last(db, "ana")
    shown = claim_next(db, "ana", queue, keep=first_tab.image_id)  # back, to decide again
    assert shown.image_id == first_tab.image_id and shown.seen is not None
    age_claims(db, "ana", CLAIM_TTL + timedelta(minutes=1))
    decide(db, "ben", shown.image_id, run_id, "relabel", 3, seen=shown.seen)
    with pytest.raises(DecidedMeanwhile) as refused:
        decide(db, "ana", shown.image_id, run_id, "accept", seen=shown.seen)
    assert (
        "was decided by ben after it was shown here (now corrected to grade 3), so this "
        "decision was not stored" in str(refused.value)
    )
    assert [r[1:4] for r in reviews(db)] == [
        ("accept", 1, "ana"),
        ("undo", None, "ana"),
        ("relabel", 3, "ben"),
    ]
    recent = recent_decisions(db, "ben")[0]  # a change names the decision it changes
    decide(db, "ben", recent.image_id, run_id, "reject", seen=recent.current_id)
    with pytest.raises(DecidedMeanwhile):
        decide(db, "ben", recent.image_id, run_id, "accept", seen=recent.current_id)


@BOTH_BACKENDS
def test_expert_labelled_images_are_never_candidates(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    train = image_ids(db, "train")
    add_predictions(db, run_id, train[:3], [(0.99, 3), (0.5, 0), (0.98, 1)])
    queue = QueueFilter(run_id)
    assert order(db, queue) == [pool[5], pool[4], pool[3], pool[2], pool[1], pool[0]]
    assert progress(db, run_id, 0.7).candidates.sum() == 6
    with pytest.raises(ValueError, match="expert label"):
        decide(db, "ana", train[0], run_id, "accept")
    assert reviews(db) == []


@BOTH_BACKENDS
def test_skipped_images_come_back_oldest_first(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    queue = QueueFilter(run_id, threshold=0.8)  # pool 3, 2, 1, 0
    assert claim_next(db, "ana", queue, skip=[pool[3]]).image_id == pool[2]
    everything = [pool[2], pool[0], pool[3], pool[1]]
    assert claim_next(db, "ana", queue, skip=everything).image_id == pool[2]
    assert claim_next(db, "ana", queue, skip=everything[1:] + everything[:1]).image_id == pool[0]


@BOTH_BACKENDS
def test_recent_decisions_show_the_current_state_and_can_be_changed(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    seen = {image_id: decide(db, "ana", image_id, run_id, "accept") for image_id in pool[:6]}
    decide(db, "ana", pool[5], run_id, "reject", seen=seen[pool[5]])  # pool 5 once in the list
    decide(db, "ben", pool[4], run_id, "relabel", 3, seen=seen[pool[4]])
    undo_last(db, "ana")
    recent = recent_decisions(db, "ana", limit=4)
    assert [r.image_id for r in recent] == [pool[5], pool[4], pool[3], pool[2]]
    first = recent[0]
    assert (first.decision, first.is_current, first.current_decision) == ("reject", False, "undo")
    assert len(recent_decisions(db, "ana")) == 6
    changed = {r.image_id: r for r in recent_decisions(db, "ana")}[pool[4]]
    assert not changed.is_current
    assert (changed.current_reviewer, changed.current_grade) == ("ben", 3)


@BOTH_BACKENDS
def test_curated_set_and_csv(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    decide(db, "ana", pool[5], run_id, "accept")
    decide(db, "ana", pool[4], run_id, "relabel", 2)
    decide(db, "ana", pool[3], run_id, "reject")
    decide(db, "ana", pool[2], run_id, "accept")
    undo_last(db, "ana")
    csv = pd.read_csv(io.StringIO(curated_csv(db)))
    assert list(csv.columns) == ["image", "grade", "origin", "reviewer", "time"]
    expert = csv[csv.origin == "expert"]
    assert len(expert) == 24 and expert.reviewer.isna().all()
    names = image_names(db)
    pseudo = csv[csv.origin == "pseudo"]
    assert dict(zip(pseudo.image, zip(pseudo.grade, pseudo.reviewer, strict=True), strict=True)) == {
        names[pool[5]]: (1, "ana"),
        names[pool[4]]: (2, "ana"),
    }
    assert pseudo.time.notna().all()
    curated = curated_set(db)
    assert len(curated) == 26 and curated.path.map(lambda p: Path(p).is_file()).all()


# Export as class folders


def test_export_class_folders_writes_grade_folders(tmp_path):
    a = write_image(tmp_path / "src" / "x" / "a.png")
    b = write_image(tmp_path / "src" / "y" / "a.png")  # the same name from another source
    c = write_image(tmp_path / "src" / "c.png")
    out = tmp_path / "out"
    result = export_class_folders(
        [(str(a), 0), (str(b), 0), (str(c), 3), (str(tmp_path / "gone.png"), 1)], out, **ANYWHERE
    )
    assert result.written == 3 and result.missing == [str(tmp_path / "gone.png")]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "0/a.png",
        "0/a_2.png",
        "3/c.png",
    ]
    assert (out / "3" / "c.png").read_bytes() == c.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "0", "1", "2", "3"]
    with pytest.raises(EarlierExport):
        export_class_folders([(str(c), 2)], out, **ANYWHERE)
    assert export_class_folders([(str(c), 2)], out, replace=True, **ANYWHERE).written == 1
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == ["2/c.png"]
    with pytest.raises(ValueError, match="0-3"):
        export_class_folders([(str(c), 4)], tmp_path / "other", **ANYWHERE)


def test_replacing_an_export_removes_only_what_it_wrote(tmp_path):
    c = write_image(tmp_path / "src" / "c.png")
    out = tmp_path / "out"
    export_class_folders([(str(c), 2)], out, **ANYWHERE)
    mine = write_image(out / "1" / "mine.png")  # someone put a file of their own there
    with pytest.raises(ExportRefused, match=r"no export of this app listed as its own \(1/mine"):
        export_class_folders([(str(c), 0)], out, replace=True, **ANYWHERE)
    assert mine.is_file() and (out / "2" / "c.png").is_file()  # nothing removed
    mine.unlink()
    (out / MANIFEST).write_text('{"files": ["../src/c.png", "2/../../src/c.png", "2/c.png"]}')
    # The manifest names only its own.
    export_class_folders([(str(c), 0)], out, replace=True, **ANYWHERE)
    assert c.is_file()
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == ["0/c.png"]


def test_an_export_never_writes_into_a_datasets_folder(tmp_path):
    c = write_image(tmp_path / "src" / "c.png")
    dataset = tmp_path / "hq"
    kept = write_image(dataset / "1" / "a.png")
    around = tmp_path / "around"  # its class folder 0 would be a dataset's folder
    for out, root in [(dataset, dataset), (dataset / "1", dataset), (around, around / "0" / "x")]:
        with pytest.raises(ExportRefused, match="folder of an imported dataset"):
            export_class_folders([(str(c), 1)], out, replace=True, source_roots=[str(root)], **ANYWHERE)
    assert sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*")) == ["1", "1/a.png"]
    assert kept.is_file() and not around.exists()


# The page


def sign_in(at: AppTest) -> AppTest:
    """Without accounts, on this machine, the page reviews as the one local user."""
    assert "Reviewing as local" in page_text(at).replace("**", "")
    return at


def click(at: AppTest, key: str) -> AppTest:
    at.button(key=key).click().run()
    assert not at.exception, at.exception
    return at


def card(at: AppTest, button: str) -> str:
    """The key of a decision button of the card on screen: its keys name the image."""
    return f"{button}_{at.session_state.current}"


def on_screen(at: AppTest) -> str:
    return at.subheader[0].value


def progress_text(at: AppTest) -> str:
    """The progress bar's count, without the per-grade counts after it."""
    return at.main.get("progress")[0].proto.text.split(" · ")[0]


def bound_keys(at: AppTest) -> dict[str, str]:
    """The buttons with a keyboard shortcut (Streamlit's own), and their keys."""
    return {button.key: button.proto.shortcut for button in at.button if button.proto.shortcut}


def viewer(at: AppTest) -> dict:
    """What the page gave the grading viewer: the photograph's size, tiles and views."""
    (component,) = at.main.get("bidi_component")
    return json.loads(component.proto.json)


def view_names(at: AppTest) -> list[str]:
    return [view["name"] for view in viewer(at)["views"]]


def test_empty_workspace_reviews_as_the_local_user_and_says_there_is_no_model(workspace):
    at = sign_in(open_page("review"))
    assert "No model yet" in page_text(at)


def test_a_model_without_predictions_says_to_run_inference(workspace, tiny_data):
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    register_run(workspace)
    at = sign_in(open_page("review"))
    assert "run inference on the Inference page first" in page_text(at)


def image_names(db_url: str) -> dict[int, str]:
    with session_scope(db_url) as session:
        return dict(session.execute(select(Image.id, Image.name)).all())


def test_reviewing_by_buttons(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    names = image_names(db)
    at = sign_in(open_page("review"))
    assert on_screen(at) == names[pool[5]]
    assert progress_text(at) == "0 of 6 candidates reviewed"
    assert len(at.get("plotly_chart")) == 1 and view_names(at) == ["photo", "red-free", "contrast", "input"]
    assert "pool" in page_text(at)  # the source's name
    assert bound_keys(at) == {  # a card's buttons name its image, so a press acts on that card alone
        f"accept_{pool[5]}": "a",
        f"reject_{pool[5]}": "x",
        f"grade_0_{pool[5]}": "0",
        f"grade_1_{pool[5]}": "1",
        f"grade_2_{pool[5]}": "2",
        f"grade_3_{pool[5]}": "3",
        f"skip_{pool[5]}": "space",
        "evidence": "g",
        "undo": "backspace",
        "keys_help": "h",
    }
    assert at.button(key="evidence").label.startswith("Show evidence")
    click(at, "keys_help")
    assert "undo your last decision" in page_text(at)

    click(at, card(at, "accept"))
    assert reviews(db) == [(pool[5], "accept", 1, "local", run_id)]
    assert on_screen(at) == names[pool[4]]
    click(at, card(at, "grade_2"))
    assert reviews(db)[-1] == (pool[4], "relabel", 2, "local", run_id)
    click(at, "undo")
    assert reviews(db)[-1] == (pool[4], "undo", None, "local", run_id)
    assert on_screen(at) == names[pool[4]]  # back on screen to decide again
    click(at, card(at, "skip"))
    assert on_screen(at) == names[pool[3]]
    click(at, card(at, "reject"))
    assert reviews(db)[-1] == (pool[3], "reject", None, "local", run_id)
    assert on_screen(at) == names[pool[2]]  # the skipped pool 4 waits for the end

    again = sign_in(open_page("review"))  # a reload: a new session carries on from the database
    assert on_screen(again) == names[pool[4]]

    at.selectbox(key=f"change_{pool[5]}").select("reject").run()  # the last-10 list
    assert not at.exception and reviews(db)[-1] == (pool[5], "reject", None, "local", run_id)
    at.selectbox(key=f"change_{pool[3]}").select(0).run()
    assert reviews(db)[-1] == (pool[3], "relabel", 0, "local", run_id)
    assert on_screen(at) == names[pool[2]]  # changing a past decision keeps the image

    assert progress_text(at) == "2 of 6 candidates reviewed"  # pool 5 and 3; 4 was undone
    at.slider(key="threshold").set_value(0.9).run()
    assert progress_text(at) == "0 of 2 candidates reviewed"
    assert on_screen(at) == names[pool[1]]
    at.multiselect(key="grades").set_value([0]).run()
    assert on_screen(at) == names[pool[0]]
    at.slider(key="threshold").set_value(0.99).run()
    assert "reaches the confidence threshold 0.99" in page_text(at)


def test_a_second_press_made_on_a_card_that_is_gone_decides_nothing(predicted):
    """A browser that had not drawn the next card yet sends a second press with the widgets of
    the card before: running the stale element again sends exactly that."""
    workspace, run_id, pool = predicted
    names = image_names(workspace.db_url)
    at = sign_in(open_page("review"))
    for button in ("reject", "grade_2", "skip"):
        first = on_screen(at)
        pressed = at.button(key=card(at, button))
        pressed.click().run()
        assert on_screen(at) != first
        shown, decided = on_screen(at), reviews(workspace.db_url)
        pressed.run()  # the same press again, from the card that has gone
        assert not at.exception and "was decided by" not in page_text(at)
        assert reviews(workspace.db_url) == decided and on_screen(at) == shown
    assert [(image_id, decision) for image_id, decision, *_ in reviews(workspace.db_url)] == [
        (pool[5], "reject"),
        (pool[4], "relabel"),
    ]
    assert on_screen(at) == names[pool[2]]  # pool 3 was skipped, once


def test_evidence_shows_grad_cam_and_the_flip_views_on_the_card(predicted):
    workspace, run_id, pool = predicted
    at = sign_in(open_page("review"))
    assert "gradcam" not in view_names(at) and len(at.get("plotly_chart")) == 1  # off by default
    click(at, "evidence")
    assert not at.exception, at.exception
    assert view_names(at)[-1] == "gradcam"  # over the photograph, where the input was cut
    (heat,) = [layer for layer in viewer(at)["layers"] if layer["name"] == "gradcam"]
    assert heat["box"] == [layer for layer in viewer(at)["layers"] if layer["name"] == "input"][0]["box"]
    flips = [c for c in at.get("plotly_chart") if "flip_views" in c.proto.id]
    assert len(flips) == 1 and '"image"' in flips[0].proto.spec
    assert '"mirror image"' in flips[0].proto.spec
    assert len(list((workspace.cache / "saliency").rglob("*.npy"))) == 1
    click(at, card(at, "skip"))  # the next card keeps the evidence on
    assert view_names(at)[-1] == "gradcam"
    assert len(list((workspace.cache / "saliency").rglob("*-0.npy"))) == 1  # pool 4's grade 0
    click(at, "evidence")
    assert "gradcam" not in view_names(at) and len(at.get("plotly_chart")) == 1


def threshold_caption(at: AppTest) -> str:
    """The sentence under the confidence threshold slider, in the queue settings."""
    (settings,) = at.main.get("popover")
    return settings.caption[0].value


def test_the_threshold_slider_says_how_often_the_model_was_right_above_it(predicted):
    workspace, run_id, pool = predicted
    at = sign_in(open_page("review"))
    assert threshold_caption(at) == "No measured accuracy: the active model's calibration was not stored."
    assert "lowering it sends its less sure predictions" in at.slider(key="threshold").help
    with session_scope(workspace.db_url) as session:
        session.get(Run, run_id).calibration = CALIBRATION
    at.run()
    assert threshold_caption(at) == "Of 120 validation images at ≥ 0.70 confidence, 85 % were right."
    at.slider(key="threshold").set_value(0.5).run()
    assert threshold_caption(at) == "Of 200 validation images at ≥ 0.50 confidence, 73 % were right."
    at.slider(key="threshold").set_value(0.75).run()
    assert threshold_caption(at).startswith(
        "Of 120 validation images at ≥ 0.70 confidence, 85 % were right. (No figure for 0.75"
    )


def test_the_page_refuses_a_decision_someone_made_meanwhile_and_leaves_held_images(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    names = image_names(db)
    at = sign_in(open_page("review"))
    assert on_screen(at) == names[pool[5]]
    decide(db, "ben", pool[5], run_id, "reject")  # in ben's browser, while local looks
    click(at, card(at, "accept"))
    assert literal(
        f"{names[pool[5]]} was decided by ben after it was shown here (now rejected)"
    ) in page_text(at)
    assert reviews(db) == [(pool[5], "reject", None, "ben", run_id)]
    assert on_screen(at) == names[pool[4]]  # moved on
    for image_id in pool[:4]:
        decide(db, "cid", image_id, run_id, "accept")
    assert claim_next(db, "ben", QueueFilter(run_id)) is None  # local holds the last candidate
    age_claims(db, "local", CLAIM_TTL + timedelta(minutes=1))  # until the tab sleeps too long
    assert claim_next(db, "ben", QueueFilter(run_id)).image_id == pool[4]
    click(at, card(at, "skip"))
    assert "the remaining 1 candidate(s) with these filters are being reviewed by others" in page_text(at)
    assert names[pool[4]] not in [header.value for header in at.subheader]


def test_the_queue_finishes_and_the_export_writes_folders(predicted, tiny_data, monkeypatch):
    workspace, run_id, pool = predicted
    for image_id in pool[1:6]:
        decide(workspace.db_url, "ben", image_id, run_id, "accept")
    at = sign_in(open_page("review"))
    click(at, card(at, "grade_3"))
    assert "Queue finished" in page_text(at)
    assert len(at.get("download_button")) == 1
    click(at, "export_folders")
    out = workspace.root / "export" / "curated"
    assert "Wrote 30 files" in page_text(at)  # 24 expert labels and 6 accepted
    assert sum(1 for _ in out.rglob("*.png")) == 30
    click(at, "export_folders")
    assert "already holds grade folders" in page_text(at)
    validation = tiny_data / "validation"  # a class-folders source: never written into
    monkeypatch.setenv("DR_EXPORT_ROOTS", str(tiny_data))  # even where exports may write
    before = sorted(validation.rglob("*"))
    at.text_input(key="export_folder").input(str(validation)).run()
    at.checkbox(key="export_replace").check().run()
    click(at, "export_folders")
    assert "inside the folder of an imported dataset" in page_text(at)
    assert sorted(validation.rglob("*")) == before


@BOTH_BACKENDS
def test_loop_overview_counts_each_stage(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    candidates = sum(confidence >= REVIEW_THRESHOLD for confidence, _ in POOL)
    assert loop_overview(db, None, REVIEW_THRESHOLD) == {
        "labelled": 24,
        "predicted": 0,
        "candidates": 0,
        "reviewed": 0,
        "runs": 1,
    }
    first = claim_next(db, "ana", QueueFilter(run_id))
    decide(db, "ana", first.image_id, run_id, "accept")
    assert loop_overview(db, run_id, REVIEW_THRESHOLD) == {
        "labelled": 24,
        "predicted": len(pool) + 2,
        "candidates": candidates,
        "reviewed": 1,
        "runs": 1,
    }


def test_a_decision_stores_the_seconds_its_card_was_on_screen_and_the_pace_shows(predicted):
    workspace, run_id, pool = predicted
    at = sign_in(open_page("review"))
    assert "left at the team's pace" not in page_text(at)  # no timed decision yet
    time.sleep(0.5)  # looking at the card
    click(at, card(at, "accept"))
    with session_scope(workspace.db_url) as session:
        seconds = session.scalar(select(Review.seconds))
    assert 0.5 <= seconds < 60
    assert "left at the team's pace" in page_text(at)


def test_names_from_files_show_as_written(predicted):
    workspace, run_id, pool = predicted
    photo, source = "**a** [b](c) $d$", "_pool_ :red[x] <b>"
    with session_scope(workspace.db_url) as session:
        session.execute(update(Image).where(Image.id == pool[5]).values(name=photo))
        session.execute(update(Source).where(Source.name == "pool").values(name=source))
    at = sign_in(open_page("review"))
    assert on_screen(at) == literal(photo)
    assert f"Source {literal(source)} · predicted" in page_text(at)
