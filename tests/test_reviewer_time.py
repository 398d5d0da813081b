"""Where the reviewers' time goes: the seconds each decision stores (db.reviews.decide), the
per-reviewer figures and the team's pace (engine.loop.agreement), the Review page's sentence
(views.pace) and the Agreement page's table, on the small workspace of test_review."""

import math

import pandas as pd
import pytest
from conftest import BOTH_BACKENDS, open_page, page_text
from test_review import predicted, reviews  # noqa: F401 (a fixture)
from test_roles import PASSWORD, quick_hashes, signed_in  # noqa: F401 (a fixture)

from db.reviews import (
    MAX_SECONDS,
    adjudicate,
    adjudication_queue,
    decide,
    decisions_frame,
    reads_frame,
    set_double_read_share,
)
from db.users import LOCAL, TERMINAL, add_account
from engine.loop.agreement import Pace, per_reviewer, time_left
from views.pace import time_left_text


def timed_by_hand(db: str, run_id: int, pool: list[int]) -> None:
    """Predicted grades (pool order) 0 1 2 3 0 1, every image read twice, seconds on screen:
    pool 2: ana 2 (10 s), ben 2 (20 s)        pool 1: ana 1 (30 s), ben 2 (40 s)
    pool 0: ana 0 (5 s), ben reject (60 s)    pool 3: ben 3 (1000 s, stored 600), ana 3 (15 s)
    pool 5: ana 2 (not timed), cleo 2 (8 s)   pool 4: ben 0 (30 s), cleo 1 (12 s)
    The conflicts on pools 1, 0 and 4 are adjudicated 1, reject and 1."""
    set_double_read_share(db, 1.0, user=LOCAL)
    for reviewer, image, decision, grade, seconds in [
        ("ana", 2, "accept", None, 10),
        ("ben", 2, "accept", None, 20),
        ("ana", 1, "accept", None, 30),
        ("ben", 1, "relabel", 2, 40),
        ("ana", 0, "accept", None, 5),
        ("ben", 0, "reject", None, 60),
        ("ben", 3, "accept", None, 1000),
        ("ana", 3, "accept", None, 15),
        ("ana", 5, "relabel", 2, None),
        ("cleo", 5, "relabel", 2, 8),
        ("ben", 4, "accept", None, 30),
        ("cleo", 4, "relabel", 1, 12),
    ]:
        decide(db, reviewer, pool[image], run_id, decision, grade, seconds=seconds)
    final = {pool[1]: 1, pool[0]: None, pool[4]: 1}
    conflicts = adjudication_queue(db)
    assert {c.image_id for c in conflicts} == set(final)
    for conflict in conflicts:
        adjudicate(db, LOCAL, conflict, final[conflict.image_id])


@BOTH_BACKENDS
def test_a_decision_stores_its_seconds_capped_and_refuses_nonsense(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    decide(db, "ana", pool[0], run_id, "accept", seconds=12.5)
    decide(db, "ana", pool[1], run_id, "reject", seconds=9 * 3600)  # a card left overnight
    decide(db, "ana", pool[2], run_id, "relabel", 1)  # not measured
    for nonsense in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="number of seconds, zero or more"):
            decide(db, "ana", pool[3], run_id, "accept", seconds=nonsense)
    assert len(reviews(db)) == 3  # nothing stored for the refused ones
    frame = decisions_frame(db)
    assert frame.seconds.tolist()[:2] == [12.5, MAX_SECONDS] == [12.5, 600.0]
    assert pd.isna(frame.seconds[2]) and frame.decision.tolist() == ["accept", "reject", "relabel"]
    newest = decisions_frame(db, last=1)  # the newest timed read, read backwards
    assert newest.image_id.tolist() == [pool[1]]


def test_per_reviewer_figures_of_a_hand_made_set(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    timed_by_hand(db, run_id, pool)
    table = per_reviewer(decisions_frame(db), reads_frame(db))
    assert table.index.tolist() == ["ana", "ben", "cleo"]
    assert table.decisions.to_dict() == {"ana": 5, "ben": 5, "cleo": 2}
    assert table.median_seconds.to_dict() == {"ana": 12.5, "ben": 40.0, "cleo": 10.0}
    # ana 4 timed in 60 s, ben 5 in 20+40+60+600+30 = 750 s, cleo 2 in 20 s.
    assert table.per_hour.to_dict() == pytest.approx({"ana": 240, "ben": 24, "cleo": 360})
    assert table.double_reads.to_dict() == {"ana": 5, "ben": 5, "cleo": 2}
    assert table.agreement.to_dict() == pytest.approx({"ana": 3 / 5, "ben": 2 / 5, "cleo": 1 / 2})
    assert table.adjudicated.to_dict() == {"ana": 2, "ben": 3, "cleo": 1}
    assert table.accuracy.to_dict() == pytest.approx({"ana": 1 / 2, "ben": 1 / 3, "cleo": 1})


def test_a_reviewer_without_double_reads_or_times_has_counts_and_gaps(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    decide(db, "ana", pool[0], run_id, "accept")
    table = per_reviewer(decisions_frame(db), reads_frame(db))
    assert table.loc["ana", ["decisions", "double_reads", "adjudicated"]].tolist() == [1, 0, 0]
    assert table.loc["ana", ["median_seconds", "per_hour", "agreement", "accuracy"]].isna().all()


def test_the_time_left_at_the_teams_recent_pace():
    start = pd.Timestamp("2026-03-02 09:00")
    recent = pd.DataFrame(
        {
            "reviewer": ["ana", "ben", "cleo", "ben"],
            "seconds": [10.0, 20.0, 40.0, None],
            "time": [
                start,
                start + pd.Timedelta(hours=2),
                start + pd.Timedelta(minutes=150),
                start + pd.Timedelta(minutes=160),
            ],
        }
    )
    # Median 20 s; ana stopped more than an hour before the newest decision: two share the work.
    assert time_left(recent, 6) == Pace(seconds_left=60.0, median_seconds=20.0, reviewers=2)
    assert time_left(recent.iloc[:1], 6) == Pace(60.0, 10.0, 1)
    assert time_left(recent.iloc[3:], 6) is None  # no decision has its seconds
    assert time_left(recent.iloc[:0], 6) is None


def test_the_review_pages_sentence_on_the_time_left(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    assert time_left_text(db, 10) is None  # no history
    timed_by_hand(db, run_id, pool)
    # Eleven timed reads, median 20 s, three reviewers at once: remaining × 20 / 3 seconds.
    assert time_left_text(db, 1170) == (
        "About 2 h 10 min left at the team's pace (median 20 s per image, 3 reviewers)."
    )
    assert time_left_text(db, 540).startswith("About 1 h left")
    assert time_left_text(db, 90).startswith("About 10 min left")
    assert time_left_text(db, 1).startswith("Under a minute left")
    assert time_left_text(db, 0) is None


def test_the_agreement_page_shows_each_reviewers_time_and_reads(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    assert "No decisions yet" in page_text(open_page("agreement"))
    timed_by_hand(db, run_id, pool)
    at = open_page("agreement")
    table = next(frame.value for frame in at.dataframe if "decisions" in frame.value.columns)
    assert table.decisions.to_dict() == {"ana": 5, "ben": 5, "cleo": 2}
    assert table.per_hour.to_dict() == pytest.approx({"ana": 240, "ben": 24, "cleo": 360})
    assert table.accuracy.to_dict() == pytest.approx({"ana": 1 / 2, "ben": 1 / 3, "cleo": 1})
    assert len(at.get("plotly_chart")) == 2  # the confusion matrix and the seconds per reviewer


def test_a_reviewer_sees_only_their_own_figures(predicted):
    workspace, run_id, pool = predicted
    db = workspace.db_url
    timed_by_hand(db, run_id, pool)
    add_account(db, "ana", "admin", PASSWORD, user=TERMINAL)
    add_account(db, "ben", "reviewer", PASSWORD, user=TERMINAL)
    for name, shown in [("ana", ["ana", "ben", "cleo"]), ("ben", ["ben"])]:
        at = signed_in(name).switch_page("views/agreement.py").run()
        assert not at.exception
        table = next(frame.value for frame in at.dataframe if "decisions" in frame.value.columns)
        assert table.index.tolist() == shown
    assert table.loc["ben"].tolist() == pytest.approx([5, 40, 24, 5, 2 / 5, 3, 1 / 3])
