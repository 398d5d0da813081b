"""The review queue on image ids in the millions, on SQLite and a real PostgreSQL server: an
id times DOUBLE_READ_FACTOR leaves PostgreSQL's 32-bit integer above id 271,181, which SQLite's
64-bit integers hide."""

import pytest
from conftest import BOTH_BACKENDS

from db.reviews import (
    ORDERS,
    QueueFilter,
    claim_next,
    decide,
    double_read,
    loop_overview,
    progress,
    set_double_read_share,
    upcoming,
)
from db.schema import Image, Prediction, Run, Source
from db.session import session_scope
from db.users import TERMINAL

FIRST_ID = 3_000_001
COUNT = 16


@pytest.fixture
def pool(db_url: str) -> tuple[str, int, list[int]]:
    """COUNT candidates on images FIRST_ID..., least confident first, grades 0-3 in turn; with
    the share at 0.5, six of them are read twice."""
    ids = list(range(FIRST_ID, FIRST_ID + COUNT))
    with session_scope(db_url) as session:
        source = Source(name="pool", kind="unlabelled", root="/pool", role="unlabelled")
        run = Run(
            name="tiny",
            model_name="test_efficientnet",
            img_size=64,
            status="done",
            checkpoint="/nowhere/tiny.pth",
        )
        session.add_all([source, run])
        session.flush()
        session.add_all(
            Image(id=image_id, source=source, path=f"{image_id}.png", name=f"p{image_id}", width=8, height=8)
            for image_id in ids
        )
        session.flush()
        for n, image_id in enumerate(ids):
            confidence, grade = 0.71 + n / 100, n % 4
            probs = [(1 - confidence) / 3] * 4
            probs[grade] = confidence
            session.add(
                Prediction(
                    run_id=run.id,
                    image_id=image_id,
                    p0=probs[0],
                    p1=probs[1],
                    p2=probs[2],
                    p3=probs[3],
                    grade=grade,
                    confidence=confidence,
                )
            )
        run_id = run.id
    set_double_read_share(db_url, 0.5, user=TERMINAL)
    return db_url, run_id, ids


def walk(db_url: str, queue: QueueFilter, reviewer: str) -> list[int]:
    """The queue as one reviewer walks it by skipping every image."""
    seen: list[int] = []
    while (candidate := claim_next(db_url, reviewer, queue, skip=seen)) and candidate.image_id not in seen:
        seen.append(candidate.image_id)
    return seen


def decide_queue(db_url: str, queue: QueueFilter, reviewer: str, most: int = COUNT) -> list[int]:
    """Accept up to `most` images of the reviewer's queue in its order; the ids decided."""
    decided = []
    while len(decided) < most and (candidate := claim_next(db_url, reviewer, queue)):
        decide(db_url, reviewer, candidate.image_id, queue.run_id, "accept", seen=candidate.seen)
        decided.append(candidate.image_id)
    return decided


@BOTH_BACKENDS
def test_large_ids_are_read_once_or_twice_and_counted(pool):
    db, run_id, ids = pool
    queue = QueueFilter(run_id)
    twice = [i for i in ids if double_read(i, 0.5)]
    assert 0 < len(twice) < COUNT

    assert decide_queue(db, queue, "ana") == ids
    assert progress(db, run_id, 0.7).sum().to_dict() == {
        "candidates": COUNT,
        "reviewed": COUNT - len(twice),
        "read_once": len(twice),
    }
    assert loop_overview(db, run_id, 0.7)["reviewed"] == COUNT - len(twice)

    assert decide_queue(db, queue, "ben") == twice  # the second reads
    assert decide_queue(db, queue, "cleo") == []
    assert progress(db, run_id, 0.7).sum().to_dict() == {
        "candidates": COUNT,
        "reviewed": COUNT,
        "read_once": 0,
    }
    assert loop_overview(db, run_id, 0.7)["reviewed"] == COUNT


@BOTH_BACKENDS
@pytest.mark.parametrize("order", ORDERS)
def test_every_order_gives_each_large_id_once_and_prepares_the_next(pool, order):
    db, run_id, ids = pool
    queue = QueueFilter(run_id, order=order, seed=1)
    decided = decide_queue(db, QueueFilter(run_id), "ana", most=4)  # reads the queries look at

    shown = walk(db, queue, "ben")
    assert sorted(shown) == sorted(set(ids) - {i for i in decided if not double_read(i, 0.5)})
    assert shown == walk(db, queue, "ben")  # an order, 'random' too, is fixed
    assert upcoming(db, "ben", queue, skip=[], after=shown[0]) == f"/pool/{shown[1]}.png"
