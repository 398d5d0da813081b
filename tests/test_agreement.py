"""Double reads, agreement and adjudication (db.reviews, engine.loop.agreement), and the
Agreement page run headless with AppTest on the small workspace of test_review."""

import pytest
from conftest import BOTH_BACKENDS, open_page, page_text
from test_review import order, predicted, reviews  # noqa: F401 (a fixture)

from db.queries import curated_set
from db.reviews import (
    DOUBLE_READ_SHARE,
    DecidedMeanwhile,
    QueueFilter,
    ReadsSettled,
    adjudicate,
    adjudication_queue,
    awaiting_second_read,
    claim_next,
    decide,
    double_read,
    double_read_share,
    progress,
    reads_frame,
    recent_decisions,
    set_double_read_share,
    undo_last,
)
from db.users import TERMINAL, User, add_account
from engine.loop.agreement import between_reviewers, confusion, per_grade, read_pairs, with_model


def admin(db: str, name: str) -> User:
    """An admin's account (one that signs in through the identity provider)."""
    return add_account(db, name, "admin", None, user=TERMINAL)


def test_the_share_is_a_shared_setting_with_a_default(predicted):
    db = predicted[0].db_url
    assert double_read_share(db) == DOUBLE_READ_SHARE == 0.10
    set_double_read_share(db, 0.25, user=TERMINAL)
    assert double_read_share(db) == 0.25
    with pytest.raises(ValueError, match="within 0-1"):
        set_double_read_share(db, 1.5, user=TERMINAL)
    assert [double_read(i, 0.10) for i in (1, 11, 12, 23)] == [False, False, True, False]
    assert sum(double_read(i, 0.10) for i in range(1000, 2000)) == 100


def test_a_double_read_image_goes_to_a_second_reviewer_and_then_leaves(predicted):
    workspace, run_id, pool = predicted
    db, queue = workspace.db_url, QueueFilter(run_id)
    set_double_read_share(db, 1.0, user=TERMINAL)
    first = claim_next(db, "ana", queue)
    decide(db, "ana", first.image_id, run_id, "accept", seen=first.seen)
    assert first.image_id not in order(db, queue, "ana")
    assert awaiting_second_read(db, "ana", queue) == 1
    assert awaiting_second_read(db, "ben", queue) == 0
    counts = progress(db, run_id, queue.threshold).sum()
    assert (counts.reviewed, counts.read_once) == (0, 1)  # not done until the second read
    second = claim_next(db, "ben", queue)
    assert second.image_id == first.image_id
    decide(db, "ben", second.image_id, run_id, "relabel", 2, seen=second.seen)
    assert first.image_id not in order(db, queue, "ben") + order(db, queue, "cleo")
    assert awaiting_second_read(db, "ana", queue) == 0
    counts = progress(db, run_id, queue.threshold).sum()
    assert (counts.reviewed, counts.read_once) == (1, 0)


def test_a_read_made_meanwhile_is_the_second_read_not_a_conflict(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    set_double_read_share(db, 1.0, user=TERMINAL)
    decide(db, "ana", pool[5], run_id, "accept", seen=None)
    decide(db, "ben", pool[5], run_id, "reject", seen=None)  # shown before ana decided
    for reviewer in ("ana", "cleo"):  # ana in another tab; a third reader
        with pytest.raises(DecidedMeanwhile):
            decide(db, reviewer, pool[5], run_id, "accept", seen=None)


def test_a_single_read_image_leaves_the_queue_after_one_decision(predicted):
    workspace, run_id, pool = predicted
    db, queue = workspace.db_url, QueueFilter(run_id)
    set_double_read_share(db, 0.5, user=TERMINAL)
    for image_id in order(db, queue, "ana"):
        decide(db, "ana", image_id, run_id, "accept")
    assert order(db, queue, "ben") == [i for i in pool[5::-1] if double_read(i, 0.5)]
    assert order(db, queue, "ana") == []


def read_by_hand(db: str, run_id: int, pool: list[int]) -> None:
    """Predicted grades (pool order) 0 1 2 3 0 1. Five images; the first four read twice:
    grade 2 by both; 1 and 2; 0 and a reject; 3 by both (ben first); one read of 2 by ana."""
    set_double_read_share(db, 1.0, user=TERMINAL)
    for reviewer, image, decision, grade in [
        ("ana", pool[2], "accept", None),
        ("ben", pool[2], "accept", None),
        ("ana", pool[1], "accept", None),
        ("ben", pool[1], "relabel", 2),
        ("ana", pool[0], "accept", None),
        ("ben", pool[0], "reject", None),
        ("ben", pool[3], "accept", None),
        ("ana", pool[3], "accept", None),
        ("ana", pool[5], "relabel", 2),
    ]:
        decide(db, reviewer, image, run_id, decision, grade)


def test_agreement_figures_of_a_hand_made_set(predicted):
    workspace, run_id, pool = predicted
    read_by_hand(workspace.db_url, run_id, pool)
    reads = reads_frame(workspace.db_url)
    pairs = read_pairs(reads)
    assert len(reads) == 9 and len(pairs) == 4
    overall = between_reviewers(pairs)
    # Graded pairs (2,2) (1,2) (3,3): sum W·O = 1/9, sum W·E = 1/3.
    assert overall["reads"] == 4 and overall["exact"] == 0.5
    assert overall["qwk"] == pytest.approx(2 / 3)
    model = with_model(reads)
    assert model.reads.to_dict() == {"ana": 5, "ben": 4}
    assert model.exact.to_dict() == {"ana": 0.8, "ben": 0.5}
    assert model.qwk.to_dict() == pytest.approx({"ana": 48 / 53, "ben": 2 / 3})
    grades = per_grade(pairs)
    assert grades.reads.tolist() == [1, 1, 3, 2, 1]
    assert grades.agreement.tolist() == pytest.approx([0, 0, 2 / 3, 1, 0])
    assert confusion(pairs).to_numpy().sum() == 4 and confusion(pairs).loc[0, "reject"] == 1


def test_conflicts_are_adjudicated_and_the_adjudicated_grade_is_curated(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    read_by_hand(db, run_id, pool)
    conflicts = adjudication_queue(db)
    assert [c.image_id for c in conflicts] == [pool[1], pool[0]]
    assert conflicts[0].reads == (("ana", "accept", 1), ("ben", "relabel", 2))
    pseudo = curated_set(db).query("origin == 'pseudo'").set_index("image_id")
    assert pseudo.grade.to_dict() == {pool[2]: 2, pool[3]: 3, pool[5]: 2}
    dora, eve = admin(db, "dora"), admin(db, "eve")
    adjudicate(db, dora, conflicts[0], 1)
    adjudicate(db, dora, conflicts[1], None)
    with pytest.raises(DecidedMeanwhile):
        adjudicate(db, eve, conflicts[0], 2)
    assert adjudication_queue(db) == []
    pseudo = curated_set(db).query("origin == 'pseudo'").set_index("image_id")
    assert pseudo.grade.to_dict() == {pool[1]: 1, pool[2]: 2, pool[3]: 3, pool[5]: 2}
    assert pseudo.reviewer[pool[1]] == "dora"
    assert len(reads_frame(db)) == 9  # an adjudication is no read


# The pages


def test_the_review_page_sets_the_share_for_everyone(predicted):
    db = predicted[0].db_url
    at = open_page("review")
    assert at.slider(key="double_read").value == 10
    at.slider(key="double_read").set_value(30).run()
    assert not at.exception and double_read_share(db) == 0.30
    set_double_read_share(db, 0.05, user=TERMINAL)  # another reviewer
    assert at.run().slider(key="double_read").value == 5


def test_the_agreement_page_shows_the_figures_and_adjudicates(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    assert "No image has two reads yet" in page_text(open_page("agreement"))
    read_by_hand(db, run_id, pool)
    at = open_page("agreement")
    metrics = {m.label: m.value for m in at.main.get("metric")}
    assert metrics == {
        "Images read twice": "4",
        "Exact agreement": "50%",
        "Quadratic-weighted kappa": "0.667",
    }
    # with_model, per_grade and each reviewer's figures; the confusion matrix (no read was timed)
    assert len(at.dataframe) == 3 and len(at.get("plotly_chart")) == 1
    assert "2 image(s) with conflicting reads wait" in page_text(at)
    assert "accepted grade 1" in page_text(at) and "corrected to grade 2" in page_text(at)
    at.button(key="adjudicate_1").click().run()  # the one local user, an admin
    assert not at.exception
    assert [c.image_id for c in adjudication_queue(db)] == [pool[0]]
    assert curated_set(db).set_index("image_id").grade[pool[1]] == 1
    at.button(key="adjudicate_reject").click().run()
    assert "No conflicting reads wait" in page_text(at)
    assert pool[0] not in curated_set(db).image_id.tolist()


def test_a_reviewer_never_sees_the_other_read(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    set_double_read_share(db, 1.0, user=TERMINAL)
    decide(db, "ana", pool[5], run_id, "accept")
    decide(db, "ben", pool[5], run_id, "reject")
    mine = recent_decisions(db, "ana")[0]
    assert mine.is_current and (mine.current_reviewer, mine.current_decision) == ("ana", "accept")


@BOTH_BACKENDS
def test_reads_stay_as_given_once_both_are_in(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    set_double_read_share(db, 1.0, user=TERMINAL)
    decide(db, "ana", pool[5], run_id, "accept")
    mine = recent_decisions(db, "ana")[0]  # before the second read she may change her mind
    assert not mine.settled
    decide(db, "ana", pool[5], run_id, "relabel", 2, seen=mine.current_id)
    assert undo_last(db, "ana") == pool[5]  # or take it back
    shown = claim_next(db, "ana", QueueFilter(run_id))
    assert shown.image_id == pool[5]
    decide(db, "ana", pool[5], run_id, "accept", seen=shown.seen)
    decide(db, "ben", pool[5], run_id, "reject")  # the second read, which disagrees
    stored = reviews(db)
    for reader in ("ana", "ben"):  # the conflict is in: neither changes nor undoes hers
        recent = recent_decisions(db, reader)[0]
        assert recent.settled  # the Review page offers no change of it
        with pytest.raises(ReadsSettled, match="has both of its blind reads") as refused:
            decide(db, reader, pool[5], run_id, "relabel", 3, seen=recent.current_id)
        assert "accept" not in str(refused.value) and "reject" not in str(refused.value)
        with pytest.raises(ReadsSettled, match="has both of its blind reads"):
            undo_last(db, reader)
    with pytest.raises(ReadsSettled):  # a third reviewer, shown it before both reads
        decide(db, "cleo", pool[5], run_id, "accept", seen=None)
    assert reviews(db) == stored
    assert [c.reads for c in adjudication_queue(db)] == [(("ana", "accept", 1), ("ben", "reject", None))]
    pairs = read_pairs(reads_frame(db))
    assert pairs.values.tolist() == [["ana", 1, "ben", "reject"]]


@BOTH_BACKENDS
def test_an_adjudication_is_final(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    set_double_read_share(db, 1.0, user=TERMINAL)
    decide(db, "ana", pool[5], run_id, "accept")
    decide(db, "ben", pool[5], run_id, "relabel", 3)
    adjudicate(db, admin(db, "dora"), adjudication_queue(db)[0], 2)
    for reader in ("ana", "ben"):
        recent = recent_decisions(db, reader)[0]
        assert (recent.current_reviewer, recent.current_grade) == ("dora", 2)
        with pytest.raises(ReadsSettled, match="has been adjudicated: the adjudicator's grade is final"):
            decide(db, reader, pool[5], run_id, "relabel", 1, seen=recent.current_id)
        assert undo_last(db, reader) is None  # the read is no longer the image's decision
    assert adjudication_queue(db) == []
    curated = curated_set(db).set_index("image_id")
    assert (curated.grade[pool[5]], curated.reviewer[pool[5]]) == (2, "dora")


def test_the_review_page_offers_no_change_of_a_settled_read(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    set_double_read_share(db, 1.0, user=TERMINAL)
    decide(db, "local", pool[5], run_id, "accept")  # the one local user's first read
    at = open_page("review")
    assert f"change_{pool[5]}" in [box.key for box in at.selectbox]
    decide(db, "ben", pool[5], run_id, "reject")  # the second read
    at.run()
    assert f"change_{pool[5]}" not in [box.key for box in at.selectbox]
    assert "settled" in [caption.value for caption in at.caption]
