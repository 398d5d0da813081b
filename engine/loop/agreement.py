"""Agreement on the ordinal grade scale: between the two blind reads of double-read images,
between each reviewer and the model, and per grade, from db.reviews.reads_frame; and where the
reviewers' time goes, from db.reviews.decisions_frame: per reviewer, and the team's pace.

The time figures are about the card's time on screen only (the seconds each decision stores)."""

from dataclasses import dataclass

import numpy as np
import pandas as pd

from engine.model.metrics import quadratic_weighted_kappa
from grades import GRADES

REJECT = "reject"
CATEGORIES: list[int | str] = [*GRADES, REJECT]
ADJUDICATE = "adjudicate"
PACE_DECISIONS = 200  # the newest timed decisions that the team's pace is the median of
# Reviewers who decided within this span of the team's newest decision count as working side
# by side. Anchored at the newest decision, not at now, so that a team that resumes in the
# morning is estimated at the size it had when it stopped.
ACTIVE = pd.Timedelta(hours=1)


def _outcome(grade) -> int | str:
    return REJECT if pd.isna(grade) else int(grade)


def read_pairs(reads: pd.DataFrame) -> pd.DataFrame:
    """The first two reads of every image that two reviewers read, one row per image:
    reviewer_1, outcome_1, reviewer_2, outcome_2 (an outcome is a grade or REJECT)."""
    ranked = reads.assign(
        outcome=reads.grade.astype(object).map(_outcome), n=reads.groupby("image_id").cumcount()
    )
    first, second = (ranked[ranked.n == n].set_index("image_id")[["reviewer", "outcome"]] for n in (0, 1))
    return first.join(second, how="inner", suffixes=("_1", "_2"))


def _agreement(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Exact agreement over all pairs; QWK over the pairs where both gave a grade."""
    graded = (a != REJECT) & (b != REJECT)
    qwk = quadratic_weighted_kappa(a[graded].astype(int), b[graded].astype(int)) if graded.any() else np.nan
    return {"reads": len(a), "exact": float((a == b).mean()) if len(a) else np.nan, "qwk": qwk}


def between_reviewers(pairs: pd.DataFrame) -> dict[str, float]:
    """How often the two blind reads of an image agree, and their QWK."""
    return _agreement(pairs.outcome_1, pairs.outcome_2)


def with_model(reads: pd.DataFrame) -> pd.DataFrame:
    """Per reviewer: reads, exact agreement with the predicted grade (a reject disagrees)
    and QWK over the graded reads."""
    outcome = reads.grade.astype(object).map(_outcome)
    rows = {
        reviewer: _agreement(outcome[group.index], group.predicted.astype(object))
        for reviewer, group in reads.groupby("reviewer")
    }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["reads", "exact", "qwk"])


def confusion(pairs: pd.DataFrame) -> pd.DataFrame:
    """Counts of (first read, second read) outcomes over CATEGORIES."""
    table = pd.crosstab(pairs.outcome_1, pairs.outcome_2)
    return table.reindex(index=CATEGORIES, columns=CATEGORIES, fill_value=0)


def per_grade(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per outcome: the reads that gave it, and the specific agreement 2·n_gg / (row + column)
    of the confusion matrix, the chance that when one reader gives it the other does too."""
    table = confusion(pairs).to_numpy()
    given = table.sum(axis=0) + table.sum(axis=1)
    with np.errstate(invalid="ignore"):
        specific = 2 * np.diag(table) / given
    return pd.DataFrame({"reads": given, "agreement": specific}, index=CATEGORIES)


def _time_on_cards(decisions: pd.DataFrame) -> pd.DataFrame:
    """Per reviewer: decisions, the median seconds a card was on screen, and decisions per hour
    of time on cards (over the decisions whose seconds were measured)."""
    made = decisions[decisions.decision != ADJUDICATE]
    seconds = made.groupby("reviewer").seconds
    total = seconds.sum()
    return pd.DataFrame(
        {
            "decisions": made.groupby("reviewer").size(),
            "median_seconds": seconds.median(),
            "per_hour": 3600 * seconds.count() / total.where(total > 0),
        }
    )


def _with_second_reader(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per reviewer: the images they read twice with another reader, and how often the two
    reads agree exactly."""
    agree = pairs.outcome_1 == pairs.outcome_2
    both = pd.concat([pd.DataFrame({"reviewer": pairs[f"reviewer_{n}"], "agree": agree}) for n in (1, 2)])
    return both.groupby("reviewer").agree.agg(double_reads="size", agreement="mean")


def _against_adjudication(decisions: pd.DataFrame, reads: pd.DataFrame) -> pd.DataFrame:
    """Per reviewer: their reads of adjudicated images, and the share that the adjudicated
    outcome (an image's newest adjudication) bears out: how reading centres measure graders."""
    adjudications = (
        decisions[decisions.decision == ADJUDICATE]
        .drop_duplicates("image_id", keep="last")
        .set_index("image_id")
    )
    final = adjudications.grade.astype(object).map(_outcome)
    judged = reads[reads.image_id.isin(final.index)]
    right = judged.grade.astype(object).map(_outcome) == judged.image_id.map(final)
    return right.groupby(judged.reviewer).agg(adjudicated="size", accuracy="mean")


def per_reviewer(decisions: pd.DataFrame, reads: pd.DataFrame) -> pd.DataFrame:
    """One row per reviewer: decisions, median_seconds per image, per_hour (decisions per hour
    of time on cards), double_reads and agreement (exact, with the other reader of each image
    read twice, as read_pairs pairs them), adjudicated and accuracy (against the adjudicated
    outcome). `decisions` is db.reviews.decisions_frame, `reads` db.reviews.reads_frame."""
    table = _time_on_cards(decisions).join(
        [_with_second_reader(read_pairs(reads)), _against_adjudication(decisions, reads)]
    )
    counts = ["double_reads", "adjudicated"]
    table[counts] = table[counts].fillna(0).astype(int)
    return table.rename_axis("reviewer")


@dataclass(frozen=True)
class Pace:
    """The team's recent pace and the time it needs for what is left."""

    seconds_left: float
    median_seconds: float  # per decision, over the recent ones
    reviewers: int  # working side by side lately


def time_left(recent: pd.DataFrame, remaining: int) -> Pace | None:
    """How long `remaining` decisions take at the team's recent pace: the median seconds per
    decision over `recent` (db.reviews.decisions_frame with last=PACE_DECISIONS), shared among
    the reviewers who decided within ACTIVE of the newest of them. None when no decision has
    its seconds: there is no pace to go by."""
    timed = recent.dropna(subset=["seconds"])
    if timed.empty:
        return None
    median = float(timed.seconds.median())
    reviewers = timed[timed.time >= timed.time.max() - ACTIVE].reviewer.nunique()
    return Pace(remaining * median / reviewers, median, reviewers)
