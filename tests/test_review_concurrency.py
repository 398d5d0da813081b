"""Reviewers in separate processes claim and decide at once on one database, SQLite and a real
PostgreSQL server: no decision is lost, the claims give them different images, and no image is
decided twice unknowingly."""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import BOTH_BACKENDS, ROOT
from sqlalchemy import select

from db.reviews import QueueFilter, claim_next, set_double_read_share
from db.schema import Claim, Image, Prediction, Review, Run, Source
from db.session import get_engine, session_scope
from db.users import TERMINAL

CANDIDATES = 60  # what the stale screens decide
REVIEWERS, DECISIONS = ("ana", "ben", "cid", "dan"), 100  # each reviewer's loop
# One reviewer's loop, as the page runs it: claim the next image, look, decide, repeat.
REVIEWER = """
import sys, time
from db.reviews import QueueFilter, claim_next, decide
db_url, reviewer, run_id, start, count = sys.argv[1:6]
time.sleep(max(0.0, float(start) - time.time()))  # all begin at the same moment
decided = []
for _ in range(int(count)):
    candidate = claim_next(db_url, reviewer, QueueFilter(int(run_id)))
    time.sleep(0.005)  # looking at the image, while the others claim
    decide(db_url, reviewer, candidate.image_id, int(run_id), "accept", seen=candidate.seen)
    decided.append(candidate.image_id)
print(" ".join(map(str, decided)))
"""
# A reviewer who decides every image as it was first shown, without claims: a stale screen.
STALE = """
import sys, time
from db.reviews import DecidedMeanwhile, decide
db_url, reviewer, run_id, start, *image_ids = sys.argv[1:]
time.sleep(max(0.0, float(start) - time.time()))
decided = []
for image_id in map(int, image_ids):
    try:
        decide(db_url, reviewer, image_id, int(run_id), "reject", seen=None)
        decided.append(image_id)
    except DecidedMeanwhile:
        pass
print(" ".join(map(str, decided)))
"""


def make_candidates(
    db_url: str, double_read_share: float = 0.0, count: int = CANDIDATES
) -> tuple[int, list[int]]:
    with session_scope(db_url) as session:
        source = Source(name="pool", kind="unlabelled", root="/nowhere", role="unlabelled")
        run = Run(
            name="tiny",
            model_name="test_efficientnet",
            img_size=64,
            status="done",
            checkpoint="/nowhere/tiny.pth",
        )
        images = [
            Image(source=source, path=f"{i}.png", name=f"img{i}", width=8, height=8) for i in range(count)
        ]
        session.add_all([run, *images])
        session.flush()
        for i, image in enumerate(images):
            confidence = 0.7 + 0.29 * i / count
            session.add(
                Prediction(
                    run_id=run.id,
                    image_id=image.id,
                    p0=confidence,
                    p1=1 - confidence,
                    p2=0.0,
                    p3=0.0,
                    grade=0,
                    confidence=confidence,
                )
            )
    # by default every image is read once
    set_double_read_share(db_url, double_read_share, user=TERMINAL)
    return run.id, [image.id for image in images]


def run_all(
    script: str, names: tuple[str, ...], db_url: str, run_id: int, *args: str
) -> dict[str, list[int]]:
    """Run `script` once per reviewer name, all starting at one moment; the image ids each
    printed."""
    start = time.time() + 3  # past every interpreter's start-up
    workers = {
        name: subprocess.Popen(
            [sys.executable, "-c", script, db_url, name, str(run_id), str(start), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    }
    decided = {}
    for name, worker in workers.items():
        out, err = worker.communicate(timeout=600)  # a busy machine is slow, not wrong
        assert worker.returncode == 0, err
        decided[name] = [int(i) for i in out.split()]
    return decided


@BOTH_BACKENDS
def test_four_reviewers_at_once_lose_nothing_and_share_no_image(db_url):
    run_id, image_ids = make_candidates(db_url, count=len(REVIEWERS) * DECISIONS)
    decided = run_all(REVIEWER, REVIEWERS, db_url, run_id, str(DECISIONS))
    # A reviewer handed an image that another had already decided would have been refused.
    assert [len(images) for images in decided.values()] == [DECISIONS] * len(REVIEWERS)

    with session_scope(db_url) as session:
        rows = session.execute(
            select(Review.image_id, Review.reviewer, Review.decision, Review.run_id).order_by(Review.id)
        ).all()
        claims = session.scalars(select(Claim)).all()
    for name, images in decided.items():  # every decision is in the database, in order
        assert [i for i, who, _, _ in rows if who == name] == images
    assert {(decision, run) for _, _, decision, run in rows} == {("accept", run_id)}
    # 400 decisions over 400 candidates: one decided twice would leave another undecided.
    assert sorted(i for i, *_ in rows) == image_ids
    assert claims == []  # every decision released its claim


@BOTH_BACKENDS
def test_stale_screens_at_once_decide_each_image_once(db_url):
    run_id, image_ids = make_candidates(db_url)
    decided = run_all(STALE, REVIEWERS, db_url, run_id, *map(str, image_ids))
    with session_scope(db_url) as session:
        rows = session.execute(select(Review.image_id, Review.reviewer).order_by(Review.id)).all()
    assert sorted(i for i, _ in rows) == image_ids  # one decision per image, the others refused
    assert sorted(i for images in decided.values() for i in images) == image_ids
    for name in REVIEWERS:
        assert [i for i, who in rows if who == name] == decided[name]


@BOTH_BACKENDS
def test_stale_screens_at_once_read_each_double_read_image_twice(db_url):
    run_id, image_ids = make_candidates(db_url, double_read_share=1.0)
    decided = run_all(STALE, REVIEWERS, db_url, run_id, *map(str, image_ids))
    with session_scope(db_url) as session:
        rows = session.execute(select(Review.image_id, Review.reviewer).order_by(Review.id)).all()
    readers = {i: [who for image, who in rows if image == i] for i in image_ids}
    assert all(len(set(who)) == len(who) == 2 for who in readers.values())  # two, different
    for name in REVIEWERS:
        assert [i for i, who in rows if who == name] == decided[name]


@pytest.mark.parametrize("backend", ["postgresql"])
def test_a_claim_passes_over_an_image_that_another_claim_is_taking(db_url):
    run_id, image_ids = make_candidates(db_url, count=3)
    queue = QueueFilter(run_id)
    with get_engine(db_url).connect() as other, ThreadPoolExecutor(1) as thread:
        # Another reviewer's claim of the first candidate, in the middle of its transaction.
        other.execute(select(Prediction.id).where(Prediction.image_id == image_ids[0]).with_for_update())
        claim = thread.submit(claim_next, db_url, "ben", queue)
        try:  # the next one, without waiting for the other transaction to end
            assert claim.result(timeout=20).image_id == image_ids[1]
        finally:
            other.rollback()
    assert claim_next(db_url, "cid", queue).image_id == image_ids[0]
