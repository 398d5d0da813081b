"""The review queue: the active model's confident predictions on images without an expert
label that have no decision yet, claims that keep two reviewers on different images,
append-only decisions, progress, and the curated set for export.

A share of the candidates (a shared setting) is read blind by two different reviewers: such
an image stays queued for the others until two have read it. Reads that disagree wait in the
adjudication queue until an adjudicator's decision, the newest row, settles the grade. Once
both reads are in, neither of them changes, and an adjudication is final: the agreement
figures keep the reads as given, and the curated set the adjudicated grade.

An image's current decision is its newest review row; a newest row 'undo' means undecided.
Every write runs in one session_scope, which is BEGIN IMMEDIATE on SQLite: writers are
serialised, so a claim or a decision and the check that precedes it cannot interleave with
another's. PostgreSQL runs writers side by side: there a claim locks the candidate it takes
(FOR UPDATE SKIP LOCKED) and checks it again once its claim is in, and a decision or an
adjudication locks its image's row before its check. Reads run in read_scope and take no lock.
"""

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import (
    BigInteger,
    BindParameter,
    Integer,
    Row,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session, aliased

from db.queries import curated_set, live_reads, open_conflicts
from db.schema import Claim, Image, Prediction, Review, Run, Setting, Source, utcnow
from db.session import read_scope, session_scope, upsert_insert
from db.settings import write_setting
from db.users import User, require_admin
from grades import GRADES, REVIEW_THRESHOLD

CLAIM_TTL = timedelta(minutes=5)  # a claim older than this is a closed tab, not a reviewer
RENEW_EVERY = CLAIM_TTL / 5  # how often an open card renews its claim
DECISIONS = ("accept", "reject", "relabel")
PRIME = 4294967291  # the largest below 2**32: image id × factor stays within 64 bits
ORDERS = ("least confident first", "most confident first", "by grade", "random")
DOUBLE_READ_SHARE = 0.10  # the default share of candidates that two reviewers read
DOUBLE_READ_KEY = "double_read_share"
# A factor coprime to 1000 permutes the ids of every block of 1000: exactly the share of them
# is double-read, spread over the block rather than its first ids.
DOUBLE_READ_FACTOR = 7919
# A card open longer than this was left (overnight, over lunch), not graded: its decision counts
# this long, so that one forgotten tab does not swamp a reviewer's decisions per hour, which sums
# the seconds. Ten minutes is more than a careful read of one photograph at native pixels takes.
MAX_SECONDS = 600.0


@dataclass(frozen=True)
class QueueFilter:
    """Which candidates of a model the queue holds, and in which order."""

    run_id: int
    threshold: float = REVIEW_THRESHOLD
    grades: tuple[int, ...] = GRADES
    band: tuple[float, float] = (0.0, 1.0)  # confidence range, on top of the threshold
    order: str = ORDERS[0]
    seed: int = 0  # the order 'random' is a fixed shuffle per seed


@dataclass(frozen=True)
class Candidate:
    """One prediction on the reviewer's screen."""

    image_id: int
    run_id: int
    name: str
    source: str
    path: str
    probs: tuple[float, float, float, float]
    grade: int
    confidence: float
    seen: int | None  # the image's newest review row when it was shown; None: it had none


@dataclass(frozen=True)
class RecentDecision:
    """A reviewer's newest decision on an image, beside the image's current decision."""

    image_id: int
    run_id: int  # the model whose candidate was decided
    name: str
    decision: str
    grade: int | None
    time: datetime
    is_current: bool
    current_id: int  # the image's newest review row, which a change must name as seen
    current_decision: str
    current_grade: int | None
    current_reviewer: str
    settled: bool  # adjudicated, or both blind reads in: no change of it is taken


class DecidedMeanwhile(Exception):
    """The image got a newer decision after it was shown; the message says by whom, in words."""


class ReadsSettled(DecidedMeanwhile):
    """The image's reads may no longer change: both blind reads of a double-read image are in,
    or an adjudicator has given the final grade. A reader who could change her read after the
    second would take her conflict out of the adjudication queue and bend the agreement
    figures; one who could change it after the adjudication would overturn it. The message
    says which, in words, and names no other reader's decision."""


def describe(decision: str, grade: int | None) -> str:
    """A decision in words: 'accepted grade 2', 'corrected to grade 1', 'rejected', 'undone',
    'adjudicated grade 3'."""
    return {
        "accept": f"accepted grade {grade}",
        "relabel": f"corrected to grade {grade}",
        "reject": "rejected",
        "undo": "undone",
        "adjudicate": "adjudicated " + ("a reject" if grade is None else f"grade {grade}"),
    }[decision]


def double_read(image_id, share: float):
    """Whether an image is read by two reviewers; `image_id` is an int or a column."""
    # Reduced before the product, so that it stays below 8 million in any integer type:
    # id × factor leaves PostgreSQL's 32-bit integer past id 271,181.
    return image_id % 1000 * DOUBLE_READ_FACTOR % 1000 < round(share * 1000)


def _share(session: Session) -> float:
    value = session.scalar(select(Setting.value).where(Setting.key == DOUBLE_READ_KEY))
    return DOUBLE_READ_SHARE if value is None else value["share"]


def double_read_share(db_url: str) -> float:
    """The share of candidates that two reviewers read blind, which every reviewer shares."""
    with read_scope(db_url) as session:
        return _share(session)


def set_double_read_share(db_url: str, share: float, *, user: User | None) -> None:
    """Set the share for every reviewer, as `user`, an admin, or db.users.TERMINAL."""
    require_admin(db_url, user, "set the double-read share")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the double-read share must be within 0-1, not {share}")
    write_setting(db_url, DOUBLE_READ_KEY, {"share": share})


def _newest_is_no(decision: str):
    """A HAVING condition on a group of review rows: its newest row is no `decision`. One pass
    over the rows, where a join with each group's newest id would read them twice."""
    return func.coalesce(func.max(case((Review.decision == decision, Review.id))), 0) < func.max(Review.id)


def _decided_images(*where):
    """Ids of images whose current decision (newest review row) is not 'undo', of the review
    rows that meet `where`."""
    return select(Review.image_id).where(*where).group_by(Review.image_id).having(_newest_is_no("undo"))


def _done_for(reviewer: str, share: float, image_id=None) -> list:
    """Conditions that keep out of `reviewer`'s queue a single-read image with a current
    decision, and a double-read one that this reviewer or two others have read (each reader's
    newest read, adjudications aside, is no undo: live_reads); with `image_id` (a number or a
    bound parameter), reading that image's reviews alone."""
    this = [] if image_id is None else [Review.image_id == image_id]
    reads = (
        select(Review.image_id, Review.reviewer)
        .where(*this, Review.decision != "adjudicate", double_read(Review.image_id, share))
        .group_by(Review.image_id, Review.reviewer)
        .having(_newest_is_no("undo"))
        .subquery()
    )
    read_by = func.sum(case((reads.c.reviewer == reviewer, 1), else_=0))
    return [
        Prediction.image_id.not_in(_decided_images(*this, ~double_read(Review.image_id, share))),
        Prediction.image_id.not_in(
            select(reads.c.image_id).group_by(reads.c.image_id).having(or_(func.count() > 1, read_by > 0))
        ),
    ]


def _current_id(image_id, blind_to: str | None = None, share: float = 0.0):
    """The id of the newest review row of `image_id` (a column of the outer query). For
    `blind_to`, other reviewers' reads of a double-read image do not count: they stay unseen."""
    newest = aliased(Review)
    where = [newest.image_id == image_id]
    if blind_to is not None:
        where.append(
            ~and_(
                newest.reviewer != blind_to,
                newest.decision.in_(DECISIONS),
                double_read(newest.image_id, share),
            )
        )
    return select(func.max(newest.id)).where(*where).scalar_subquery()


def _labelled_images():
    """Images no reviewer decides: those with an expert grade, and the validation sources'.
    Two index lookups (ix_images_graded, the sources) instead of an OR that scans every image
    of a pool: 16 ms at 100k images (bench/pool.py)."""
    return union_all(
        select(Image.id).where(Image.grade.is_not(None)),
        select(Image.id).join(Source).where(Source.role == "validation"),
    )


def _candidates(run_id: int, threshold: float) -> list:
    # NOT IN over materialised sets keeps the scan on ix_predictions_run_confidence_grade.
    return [
        Prediction.run_id == run_id,
        Prediction.confidence >= threshold,
        Prediction.image_id.not_in(_labelled_images()),
    ]


def _filtered(queue: QueueFilter) -> list:
    low, high = queue.band
    # One lower bound: given two, SQLite may start the index range at the looser one.
    return [
        *_candidates(queue.run_id, max(queue.threshold, low)),
        Prediction.confidence <= high,
        Prediction.grade.in_(queue.grades),
    ]


def _queue(queue: QueueFilter, reviewer: str, share: float) -> list:
    return [*_filtered(queue), *_done_for(reviewer, share)]


def _order(queue: QueueFilter) -> tuple:
    if queue.order == "most confident first":
        return Prediction.confidence.desc(), Prediction.id.desc()
    if queue.order == "by grade":
        return Prediction.grade, Prediction.confidence, Prediction.id
    if queue.order == "random":  # a hash whose factors come from the seed: a fixed shuffle
        draw = random.Random(queue.seed)
        factor, offset = draw.randrange(1, PRIME), draw.randrange(PRIME)
        return (cast(Prediction.image_id, BigInteger) * factor + offset) % PRIME, Prediction.id
    return Prediction.confidence, Prediction.id


def _claimed_by_others(reviewer: str):
    # The time is taken when the statement runs: _free's statements are made once and kept.
    live_after: BindParameter[datetime] = bindparam("live_after", callable_=lambda: utcnow() - CLAIM_TTL)
    return select(Claim.image_id).where(Claim.reviewer != reviewer, Claim.claimed_at >= live_after)


@functools.cache
def _claim_upsert(insert):
    """The claim statement for the database's INSERT construct (upsert_insert): a new claim on
    `:claim_image` for `:claim_reviewer` at `:claim_time`, or that reviewer's claim renewed,
    or another reviewer's claim taken over once it is older than `:live_after`."""
    values = insert(Claim).values(
        image_id=bindparam("claim_image"),
        reviewer=bindparam("claim_reviewer"),
        claimed_at=bindparam("claim_time"),
    )
    return values.on_conflict_do_update(
        index_elements=["image_id"],
        set_={"reviewer": values.excluded.reviewer, "claimed_at": values.excluded.claimed_at},
        where=or_(Claim.reviewer == bindparam("claim_reviewer"), Claim.claimed_at < bindparam("live_after")),
    ).returning(Claim.image_id)  # psycopg reports no rowcount for an upsert


def _hold(session: Session, reviewer: str, image_id: int) -> bool:
    """Claim the image for `reviewer`, or renew the claim; False when another reviewer's claim
    on it is live."""
    now = utcnow()
    held = session.execute(
        _claim_upsert(upsert_insert(session)),
        {
            "claim_image": image_id,
            "claim_reviewer": reviewer,
            "claim_time": now,
            "live_after": now - CLAIM_TTL,
        },
    )
    return held.first() is not None


def _newest_review(session: Session, image_id: int) -> int | None:
    return session.scalar(select(func.max(Review.id)).where(Review.image_id == image_id))


# Making the queue's statements costs SQLAlchemy more time than PostgreSQL takes to run them
# (bench.pool): they are made once per reviewer, queue and share, and kept.
@functools.lru_cache(maxsize=256)
def _free(reviewer: str, queue: QueueFilter, share: float) -> tuple:
    """Conditions on a prediction: in the reviewer's queue, and no one else holds it."""
    return (*_queue(queue, reviewer, share), Prediction.image_id.not_in(_claimed_by_others(reviewer)))


def _pick(
    session: Session, free: list, queue: QueueFilter, skip: Sequence[int], keep: int | None
) -> int | None:
    """The image to show: `keep` while it is still `free`; else the first free image not
    skipped; else the longest-skipped free one; else none.

    On PostgreSQL the chosen row stays locked until the claim commits, and rows that another
    reviewer's claim has locked are passed over (FOR UPDATE SKIP LOCKED): reviewers claiming
    at once get different images without waiting for each other. SQLite ignores the clause;
    BEGIN IMMEDIATE has serialised the claims there."""
    pick = select(Prediction.image_id).where(*free).with_for_update(skip_locked=True, of=Prediction)
    if keep is not None and session.scalar(pick.where(Prediction.image_id == keep)) is not None:
        return keep
    first = pick.order_by(*_order(queue)).limit(1)
    image_id = session.scalar(first.where(Prediction.image_id.not_in(skip)))
    if image_id is None and skip:
        skipped = set(session.scalars(pick.where(Prediction.image_id.in_(skip))))
        image_id = next((i for i in skip if i in skipped), None)
    return image_id


@functools.lru_cache(maxsize=256)
def _card(reviewer: str, run_id: int, share: float):
    """What the reviewer's screen shows of the run's prediction on image `:image_id`, while
    that image is undecided for `reviewer`; it reads that image's reviews alone."""
    image_id = bindparam("image_id", type_=Integer)
    newest = select(func.max(Review.id)).where(Review.image_id == image_id).scalar_subquery()
    return (
        select(
            Image.name,
            Source.name,
            Source.root,
            Image.path,
            Prediction.p0,
            Prediction.p1,
            Prediction.p2,
            Prediction.p3,
            Prediction.grade,
            Prediction.confidence,
            newest,
        )
        .join(Image, Image.id == Prediction.image_id)
        .join(Source)
        .where(
            Prediction.run_id == run_id,
            Prediction.image_id == image_id,
            *_done_for(reviewer, share, image_id),
        )
    )


def _claimed_card(
    session: Session, reviewer: str, run_id: int, share: float, image_id: int
) -> Candidate | None:
    """The picked image for the screen, read once the claim is in; None when it is no longer
    undecided for `reviewer`. On PostgreSQL another reviewer may have decided it after the
    pick's snapshot was taken, and this fresh statement sees it (nothing else about a
    prediction changes meanwhile, and the claim is in). On SQLite BEGIN IMMEDIATE has kept
    every other writer out since the pick."""
    row = session.execute(_card(reviewer, run_id, share), {"image_id": image_id}).first()
    if row is None:
        return None
    name, source, root, path, p0, p1, p2, p3, grade, confidence, seen = row
    return Candidate(
        image_id, run_id, name, source, f"{root}/{path}", (p0, p1, p2, p3), grade, confidence, seen
    )


def claim_next(
    db_url: str, reviewer: str, queue: QueueFilter, skip: Sequence[int] = (), keep: int | None = None
) -> Candidate | None:
    """Claim the next image for `reviewer` and return it; None when no candidate is free.

    `skip` lists the images this reviewer skipped, oldest first: they come back only when
    nothing else is left. An image another reviewer claimed within CLAIM_TTL is never given
    out (held_by_others counts them). The reviewer's other claims are released."""
    with session_scope(db_url) as session:
        session.execute(delete(Claim).where(Claim.reviewer == reviewer))
        share = _share(session)
        lost: list[int] = []
        free = _free(reviewer, queue, share)
        while (
            image_id := _pick(session, [*free, Prediction.image_id.not_in(lost)], queue, skip, keep)
        ) is not None:
            if _hold(session, reviewer, image_id) and (
                card := _claimed_card(session, reviewer, queue.run_id, share, image_id)
            ):
                return card
            session.execute(delete(Claim).where(Claim.reviewer == reviewer))
            lost.append(image_id)
        return None


def upcoming(db_url: str, reviewer: str, queue: QueueFilter, skip: Sequence[int], after: int) -> str | None:
    """The photograph that `reviewer`'s queue most likely gives after `after` (a skipped one
    aside), for a viewer to prepare while `after` is graded; None at the queue's end. Nothing
    is claimed: someone else may take it meanwhile."""
    with read_scope(db_url) as session:
        row = session.execute(
            select(Source.root, Image.path)
            .select_from(Prediction)
            .join(Image, Image.id == Prediction.image_id)
            .join(Source)
            .where(
                *_free(reviewer, queue, _share(session)),
                Prediction.image_id != after,
                Prediction.image_id.not_in(skip),
            )
            .order_by(*_order(queue))
            .limit(1)
        ).first()
    return None if row is None else f"{row.root}/{row.path}"


def held_by_others(db_url: str, reviewer: str, queue: QueueFilter) -> int:
    """Undecided candidates of the queue that other reviewers hold now."""
    with read_scope(db_url) as session:
        return session.execute(
            select(func.count(Prediction.id)).where(
                *_queue(queue, reviewer, _share(session)),
                Prediction.image_id.in_(_claimed_by_others(reviewer)),
            )
        ).scalar_one()


def _read_once(share: float, by: str | None = None):
    """Ids of double-read images that one reviewer (`by`, when given) has read so far."""
    reads = live_reads().subquery()
    once = (
        select(reads.c.image_id)
        .where(double_read(reads.c.image_id, share))
        .group_by(reads.c.image_id)
        .having(func.count() == 1)
    )
    return once if by is None else once.having(func.max(reads.c.reviewer) == by)


def awaiting_second_read(db_url: str, reviewer: str, queue: QueueFilter) -> int:
    """Double-read candidates of the queue that only this reviewer has read so far."""
    with read_scope(db_url) as session:
        return session.execute(
            select(func.count(Prediction.id)).where(
                *_filtered(queue), Prediction.image_id.in_(_read_once(_share(session), reviewer))
            )
        ).scalar_one()


def renew_claim(db_url: str, reviewer: str, image_id: int, seen: int | None) -> bool:
    """Keep holding an image while its card is open; False when that is no longer possible:
    it has a newer decision than `seen` (other than the first read of a double-read image),
    or another reviewer holds it now."""
    with session_scope(db_url) as session:
        return _open(session, reviewer, image_id, seen) and _hold(session, reviewer, image_id)


def _second_read(session: Session, reviewer: str, image_id: int, seen: int | None) -> bool:
    """Whether all that came after `seen` is another reviewer's blind read of a double-read
    image, which this reviewer's read completes (or replaces, for their own earlier read)."""
    newer = session.execute(
        select(Review.reviewer, Review.decision).where(Review.image_id == image_id, Review.id > (seen or 0))
    ).all()
    readers = {read.reviewer for read in session.execute(live_reads(image_id))}
    return (
        double_read(image_id, _share(session))
        and len(readers - {reviewer}) < 2
        and all(who != reviewer and what != "adjudicate" for who, what in newer)
    )


def _open(session: Session, reviewer: str, image_id: int, seen: int | None) -> bool:
    """Whether a decision of `reviewer` on an image shown at `seen` still holds."""
    return _newest_review(session, image_id) == seen or _second_read(session, reviewer, image_id, seen)


def _lock_image(session: Session, image_id: int) -> None:
    """Make the writers of one image's decisions wait for each other on PostgreSQL, so that a
    check of its newest decision and the write after it are one step, as BEGIN IMMEDIATE makes
    them on SQLite. NO KEY UPDATE leaves the rows that refer to the image free to be written."""
    session.execute(select(Image.id).where(Image.id == image_id).with_for_update(key_share=True))


def _settled(session: Session, image_id: int) -> str | None:
    """Why the image's reads may no longer change, in words; None while they may."""
    adjudicated = (
        select(Review.id).where(Review.image_id == image_id, Review.decision == "adjudicate").limit(1)
    )
    if session.scalar(adjudicated) is not None:
        return "has been adjudicated: the adjudicator's grade is final"
    readers = select(func.count()).select_from(live_reads(image_id).subquery())
    if double_read(image_id, _share(session)) and session.execute(readers).scalar_one() > 1:
        return (
            "has both of its blind reads: a read of a double-read image cannot change "
            "once the second is in (an admin adjudicates reads that disagree)"
        )
    return None


def _refuse_if_settled(session: Session, image_id: int) -> None:
    """ReadsSettled once an adjudication, or both reads of a double-read image, are in. Asked
    before `seen` is, so that a reviewer who was shown the image earlier learns no reader's
    decision from the refusal."""
    why = _settled(session, image_id)
    if why is not None:
        name = session.scalar(select(Image.name).where(Image.id == image_id))
        raise ReadsSettled(f"{name} {why}, so this was not stored.")


def _refuse_if_decided(session: Session, reviewer: str, image_id: int, seen: int | None) -> None:
    if _open(session, reviewer, image_id, seen):
        return
    newest_id = _newest_review(session, image_id)
    newest = session.execute(
        select(Review.reviewer, Review.decision, Review.grade, Image.name)
        .join(Image, Image.id == Review.image_id)
        .where(Review.id == newest_id)
    ).one()
    who = "you, in another tab or window" if newest.reviewer == reviewer else newest.reviewer
    raise DecidedMeanwhile(
        f"{newest.name} was decided by {who} after it was shown here (now "
        f"{describe(newest.decision, newest.grade)}), so this decision "
        "was not stored."
    )


def _refuse_if_labelled(session: Session, image_id: int) -> None:
    name = session.scalar(
        select(Image.name)
        .join(Source)
        .where(Image.id == image_id, or_(Image.grade.is_not(None), Source.role == "validation"))
    )
    if name is not None:
        raise ValueError(
            f"{name} has an expert label or belongs to a validation source: "
            "only unlabelled images are reviewed"
        )


def _card_seconds(seconds: float | None) -> float | None:
    """The seconds to store for a card's time on screen, capped at MAX_SECONDS."""
    if seconds is None:
        return None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(
            f"the time a card was on screen must be a number of seconds, zero or more, not {seconds!r}"
        )
    return min(float(seconds), MAX_SECONDS)


def decide(
    db_url: str,
    reviewer: str,
    image_id: int,
    run_id: int,
    decision: str,
    grade: int | None = None,
    seen: int | None = None,
    seconds: float | None = None,
) -> int:
    """Append a decision on the prediction of `run_id` for an image, release its claim and
    return the review id. 'accept' stores the predicted grade, 'relabel' the given one.

    `seen` is the image's newest review row when it was shown (Candidate.seen,
    RecentDecision.current_id; None: it had none): a newer one, by anyone, raises
    DecidedMeanwhile and nothing is stored, unless it is another reviewer's blind read of a
    double-read image, which this decision completes as the second read. Any decision on an
    image whose reads are settled (adjudicated, or both reads in) raises ReadsSettled, and
    one with an expert label ValueError.

    `seconds` is how long the card was on screen before this decision (None: not measured),
    stored capped at MAX_SECONDS; a negative or non-finite value raises ValueError."""
    if not reviewer.strip():
        raise ValueError("a decision needs the reviewer's name")
    seconds = _card_seconds(seconds)
    if decision not in DECISIONS:
        raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
    if decision == "relabel" and grade not in GRADES:
        raise ValueError(f"a correction needs a grade 0-3, not {grade!r}")
    with session_scope(db_url) as session:
        predicted = session.scalar(
            select(Prediction.grade).where(Prediction.run_id == run_id, Prediction.image_id == image_id)
        )
        if predicted is None:
            raise ValueError(f"run {run_id} has no prediction for image {image_id}")
        _refuse_if_labelled(session, image_id)
        _lock_image(session, image_id)
        _refuse_if_settled(session, image_id)
        _refuse_if_decided(session, reviewer, image_id, seen)
        stored = {"accept": predicted, "relabel": grade, "reject": None}[decision]
        review = Review(
            image_id=image_id,
            run_id=run_id,
            decision=decision,
            grade=stored,
            reviewer=reviewer,
            seconds=seconds,
        )
        session.add(review)
        session.execute(delete(Claim).where(Claim.image_id == image_id))
        session.flush()
        return review.id


def undo_last(db_url: str, reviewer: str) -> int | None:
    """Undo this reviewer's newest decision that is still its image's current one, as they see
    it (another reader's blind read does not count): append an 'undo' row and return the image
    id; None when there is nothing to undo. ReadsSettled when that decision is a read that
    may no longer change."""
    with session_scope(db_url) as session:
        row = session.execute(
            select(Review.image_id, Review.run_id)
            .where(
                Review.reviewer == reviewer,
                Review.decision.in_(DECISIONS),
                Review.id == _current_id(Review.image_id, reviewer, _share(session)),
            )
            .order_by(Review.id.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        _lock_image(session, row.image_id)
        _refuse_if_settled(session, row.image_id)
        session.add(
            Review(image_id=row.image_id, run_id=row.run_id, decision="undo", grade=None, reviewer=reviewer)
        )
        return row.image_id


def recent_decisions(db_url: str, reviewer: str, limit: int = 10) -> list[RecentDecision]:
    """The reviewer's newest decision on each of the last `limit` images they decided,
    newest first, with each image's current decision (it may be an undo or someone else's;
    another reviewer's blind read of a double-read image is not shown)."""
    mine = aliased(Review)
    newest_mine = (
        select(func.max(mine.id))
        .where(mine.image_id == Review.image_id, mine.reviewer == reviewer, mine.decision.in_(DECISIONS))
        .scalar_subquery()
    )
    with read_scope(db_url) as session:
        rows = session.execute(
            select(
                Review.id,
                Review.image_id,
                Review.run_id,
                Image.name,
                Review.decision,
                Review.grade,
                Review.created_at,
            )
            .join(Image, Image.id == Review.image_id)
            .where(Review.reviewer == reviewer, Review.decision.in_(DECISIONS), Review.id == newest_mine)
            .order_by(Review.id.desc())
            .limit(limit)
        ).all()
        current = {
            row.image_id: row
            for row in session.execute(
                select(Review.id, Review.image_id, Review.decision, Review.grade, Review.reviewer).where(
                    Review.image_id.in_([r.image_id for r in rows]),
                    Review.id == _current_id(Review.image_id, reviewer, _share(session)),
                )
            )
        }
        settled = {r.image_id for r in rows if _settled(session, r.image_id) is not None}
    decisions = []
    for review_id, image_id, run_id, name, decision, grade, time in rows:
        assert run_id is not None  # decide() writes every accept, reject and relabel with its run
        decisions.append(
            RecentDecision(
                image_id,
                run_id,
                name,
                decision,
                grade,
                time,
                current[image_id].id == review_id,
                current[image_id].id,
                current[image_id].decision,
                current[image_id].grade,
                current[image_id].reviewer,
                image_id in settled,
            )
        )
    return decisions


@dataclass(frozen=True)
class Conflict:
    """A double-read image whose reads disagree, waiting for an adjudicator."""

    image_id: int
    run_id: int | None
    name: str
    path: str
    predicted: int | None
    reads: tuple[tuple[str, str, int | None], ...]  # (reviewer, decision, grade), oldest first
    seen: int  # the image's newest review row, which the adjudication must name


def _reads(session: Session, image_ids=None) -> Sequence[Row]:
    """Current reads (of the images that the select `image_ids` lists, if given), oldest
    first, with their image and the grade their model predicted."""
    reads = live_reads().subquery()
    query = (
        select(
            reads.c.image_id,
            reads.c.run_id,
            Image.name,
            Source.root,
            Image.path,
            Prediction.grade.label("predicted"),
            reads.c.reviewer,
            reads.c.decision,
            reads.c.grade,
        )
        .join(Image, Image.id == reads.c.image_id)
        .join(Source)
        .outerjoin(
            Prediction, (Prediction.run_id == reads.c.run_id) & (Prediction.image_id == reads.c.image_id)
        )
        .order_by(reads.c.id)
    )
    if image_ids is not None:
        query = query.where(reads.c.image_id.in_(image_ids))
    return session.execute(query).all()


def reads_frame(db_url: str) -> pd.DataFrame:
    """Every reviewer's current read of each image, oldest first, beside the grade the model
    predicted: what agreement is measured on. `grade` is missing for a reject."""
    with read_scope(db_url) as session:
        rows = _reads(session)
    frame = pd.DataFrame(
        [(r.image_id, r.name, r.reviewer, r.decision, r.grade, r.predicted) for r in rows],
        columns=["image_id", "image", "reviewer", "decision", "grade", "predicted"],
    )
    return frame.astype({"grade": "Int64", "predicted": "Int64"})


def decisions_frame(db_url: str, last: int | None = None) -> pd.DataFrame:
    """Every read (accept, reject, correction; undone or changed ones too, as each took its
    time) and adjudication, oldest first, with the seconds its card was on screen: where the
    reviewers' time goes. `seconds` is missing where it was not measured (decisions made before
    it was stored), `grade` for a reject. `last`: only the newest `last` reads with seconds,
    which is what a pace needs, read backwards along the primary key."""
    query = select(
        Review.id,
        Review.image_id,
        Review.reviewer,
        Review.decision,
        Review.grade,
        Review.seconds,
        Review.created_at,
    ).order_by(Review.id.desc())
    if last is None:
        query = query.where(Review.decision.in_([*DECISIONS, "adjudicate"]))
    else:
        query = query.where(Review.decision.in_(DECISIONS), Review.seconds.is_not(None)).limit(last)
    with read_scope(db_url) as session:  # plain tuples: pandas inspects each Row otherwise
        rows = [tuple(row) for row in session.connection().execute(query)]
    frame = pd.DataFrame(
        rows[::-1], columns=["id", "image_id", "reviewer", "decision", "grade", "seconds", "time"]
    )
    return frame.astype({"grade": "Int64", "seconds": float})


def adjudication_queue(db_url: str) -> list[Conflict]:
    """The images whose reads disagree and that no adjudication settled, oldest first."""
    with read_scope(db_url) as session:
        rows = _reads(session, open_conflicts())
        seen = dict(
            session.execute(
                select(Review.image_id, func.max(Review.id))
                .where(Review.image_id.in_({r.image_id for r in rows}))
                .group_by(Review.image_id)
            ).all()
        )
    conflicts: dict[int, list] = {}
    for row in rows:
        conflicts.setdefault(row.image_id, []).append(row)
    return [
        Conflict(
            image_id,
            reads[-1].run_id,
            reads[0].name,
            f"{reads[0].root}/{reads[0].path}",
            reads[-1].predicted,
            tuple((r.reviewer, r.decision, r.grade) for r in reads),
            seen[image_id],
        )
        for image_id, reads in conflicts.items()
    ]


def adjudicate(db_url: str, adjudicator: User, conflict: Conflict, grade: int | None) -> int:
    """Append the final grade of a conflict (None: reject), given by `adjudicator`, an admin
    (db.users.NotAllowed otherwise), and return the review id; raises DecidedMeanwhile when
    the image got a newer row since `conflict` was read."""
    if grade is not None and grade not in GRADES:
        raise ValueError(f"an adjudicated grade must be 0-3, not {grade!r}")
    require_admin(db_url, adjudicator, "adjudicate")
    with session_scope(db_url) as session:
        _lock_image(session, conflict.image_id)
        _refuse_if_decided(session, adjudicator.name, conflict.image_id, conflict.seen)
        review = Review(
            image_id=conflict.image_id,
            run_id=conflict.run_id,
            decision="adjudicate",
            grade=grade,
            reviewer=adjudicator.name,
        )
        session.add(review)
        session.flush()
        return review.id


def has_predictions(db_url: str, run_id: int) -> bool:
    """Whether inference has run with this model at all."""
    with read_scope(db_url) as session:
        return session.scalar(select(Prediction.id).where(Prediction.run_id == run_id).limit(1)) is not None


def progress(db_url: str, run_id: int, threshold: float) -> pd.DataFrame:
    """Per predicted grade (index 0-3): candidates at or above the threshold, how many of
    them have a current decision (by anyone, whichever model was active then) and need no
    other, and how many double-read ones wait for their second read."""
    with read_scope(db_url) as session:
        once = Prediction.image_id.in_(_read_once(_share(session)))
        reviewed = case((and_(Prediction.image_id.in_(_decided_images()), ~once), 1), else_=0)
        rows = session.execute(
            select(
                Prediction.grade,
                func.count(Prediction.id),
                func.sum(reviewed),
                func.sum(case((once, 1), else_=0)),
            )
            .where(*_candidates(run_id, threshold))
            .group_by(Prediction.grade)
        ).all()
    frame = pd.DataFrame(rows, columns=["grade", "candidates", "reviewed", "read_once"])
    return frame.set_index("grade").reindex(list(GRADES), fill_value=0).astype(int)


def curated_csv(db_url: str) -> str:
    """The curated labels as CSV text: image, grade, origin, reviewer, time."""
    return curated_set(db_url)[["image", "grade", "origin", "reviewer", "time"]].to_csv(index=False)


def loop_overview(db_url: str, run_id: int | None, threshold: float) -> dict[str, int]:
    """Where the curation loop stands: expert-labelled images, predictions of the active
    model, its review candidates and how many of them are decided, training runs."""
    with read_scope(db_url) as session:
        labelled = session.execute(
            select(func.count(Image.id)).join(Source).where(Source.role == "train", Image.grade.is_not(None))
        ).scalar_one()
        runs = session.execute(select(func.count(Run.id))).scalar_one()
        predicted = (
            session.execute(select(func.count(Prediction.id)).where(Prediction.run_id == run_id)).scalar_one()
            if run_id
            else 0
        )
    counts = progress(db_url, run_id, threshold).sum() if run_id else {}
    return {
        "labelled": labelled,
        "predicted": predicted,
        "candidates": int(counts.get("candidates", 0)),
        "reviewed": int(counts.get("reviewed", 0)),
        "runs": runs,
    }
