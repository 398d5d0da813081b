"""Agreement on the ordinal grade scale: between the two blind reads of double-read images,
between each reviewer and the model, and per grade, from db.reviews.reads_frame."""

import numpy as np
import pandas as pd

from engine.metrics import quadratic_weighted_kappa
from grades import GRADES

REJECT = "reject"
CATEGORIES = [*GRADES, REJECT]


def _outcome(grade) -> int | str:
    return REJECT if pd.isna(grade) else int(grade)


def read_pairs(reads: pd.DataFrame) -> pd.DataFrame:
    """The first two reads of every image that two reviewers read, one row per image:
    reviewer_1, outcome_1, reviewer_2, outcome_2 (an outcome is a grade or REJECT)."""
    ranked = reads.assign(outcome=reads.grade.astype(object).map(_outcome),
                          n=reads.groupby("image_id").cumcount())
    first, second = (ranked[ranked.n == n].set_index("image_id")[["reviewer", "outcome"]]
                     for n in (0, 1))
    return first.join(second, how="inner", suffixes=("_1", "_2"))


def _agreement(a: pd.Series, b: pd.Series) -> dict[str, float]:
    """Exact agreement over all pairs; QWK over the pairs where both gave a grade."""
    graded = (a != REJECT) & (b != REJECT)
    qwk = quadratic_weighted_kappa(a[graded].astype(int), b[graded].astype(int)) \
        if graded.any() else np.nan
    return {"reads": len(a), "exact": float((a == b).mean()) if len(a) else np.nan, "qwk": qwk}


def between_reviewers(pairs: pd.DataFrame) -> dict[str, float]:
    """How often the two blind reads of an image agree, and their QWK."""
    return _agreement(pairs.outcome_1, pairs.outcome_2)


def with_model(reads: pd.DataFrame) -> pd.DataFrame:
    """Per reviewer: reads, exact agreement with the predicted grade (a reject disagrees)
    and QWK over the graded reads."""
    outcome = reads.grade.astype(object).map(_outcome)
    rows = {reviewer: _agreement(outcome[group.index], group.predicted.astype(object))
            for reviewer, group in reads.groupby("reviewer")}
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
