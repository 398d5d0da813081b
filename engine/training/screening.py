"""A run's screening figures: its validation probabilities, the operating point for referable
DR chosen on them (an admin may choose another target sensitivity), and whether two runs
differ by more than the noise of the validation images.

The probabilities are those of the model that was validated: the run's own, or with
--refit that of its validation phase, whose temperature and operating point the run took, or
with --folds each image's from the one of the run's models that did not learn it.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.data.datasets import Sample, person_halves, read_probabilities
from engine.model.metrics import (
    REFERABLE,
    RESAMPLES,
    group_resamples,
    percentile_interval,
    quadratic_weighted_kappa,
    referable_score,
    roc_auc,
    sensitivity_specificity,
    validation_screening,
)
from engine.training.refit import VALIDATION
from engine.training.trainer import VALIDATION_FILE


def validation_file(checkpoint: str | Path) -> Path | None:
    """The validation probabilities stored beside a run's checkpoint; None for a run trained
    before they were stored (or imported from a file)."""
    folder = Path(checkpoint).parent
    for path in (folder / VALIDATION / VALIDATION_FILE, folder / VALIDATION_FILE):
        if path.is_file():
            return path
    return None


def choose_operating_point(checkpoint: str | Path, sensitivity: float, seed: int = 0) -> dict:
    """The screening summary (engine.model.metrics.validation_screening) of a run at another target
    sensitivity, from its stored validation probabilities; `seed` makes the halves the run
    made (its screening summary names it)."""
    path = validation_file(checkpoint)
    if path is None:
        raise FileNotFoundError(f"no validation probabilities are stored beside {checkpoint}")
    samples, probs = read_probabilities(path)
    return {
        **validation_screening(
            probs,
            np.array([s.grade for s in samples]),
            [s.group for s in samples],
            person_halves(samples, seed),
            sensitivity,
        ),
        "seed": seed,
    }


def roc_points(samples: list[Sample], probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1 - specificity, sensitivity) of referable DR at every threshold, for the ROC curve."""
    positive = np.array([s.grade for s in samples]) >= REFERABLE
    order = np.argsort(-referable_score(probs), kind="mergesort")
    hits = np.concatenate([[0], np.cumsum(positive[order])])
    misses = np.concatenate([[0], np.cumsum(~positive[order])])
    return misses / max(misses[-1], 1), hits / max(hits[-1], 1)


def validation_roc(path: Path, threshold: float) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """The ROC curve of a run's stored validation probabilities, and (sensitivity,
    specificity) at `threshold` on all of them."""
    samples, probs = read_probabilities(path)
    positive = np.array([s.grade for s in samples]) >= REFERABLE
    return (
        *roc_points(samples, probs),
        sensitivity_specificity(positive, referable_score(probs) >= threshold),
    )


Judged = tuple[list[Sample], np.ndarray]  # images, and one model's probabilities of them


def paired_difference(first: Judged, second: Judged) -> dict:
    """QWK and referable AUC of the first run minus the second's on the validation images both
    were judged on, each with its paired 95 % interval by person, and whether the interval
    leaves out 0 (the difference is larger than the noise)."""
    return repeated_difference([(first, second)])


def _paired(first: Judged, second: Judged) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Labels, the two models' probabilities and the groups of the images both judged."""
    theirs = {s.path: row for s, row in zip(*second, strict=True)}
    shared = [n for n, s in enumerate(first[0]) if s.path in theirs]
    samples = [first[0][n] for n in shared]
    b = np.array([theirs[s.path] for s in samples]).reshape(-1, 4)
    return np.array([s.grade for s in samples]), first[1][shared], b, [s.group for s in samples]


DIFFERENCES = {
    "qwk": lambda y, a, b: (
        quadratic_weighted_kappa(y, a.argmax(1)) - quadratic_weighted_kappa(y, b.argmax(1))
    ),
    "referable_auc": lambda y, a, b: (
        roc_auc(y >= REFERABLE, referable_score(a)) - roc_auc(y >= REFERABLE, referable_score(b))
    ),
}


def repeated_difference(pairs: Sequence[tuple[Judged, Judged]], resamples: int = RESAMPLES) -> dict:
    """The first model minus the second in QWK and referable AUC, on the images both were
    judged on, averaged over repeats (a pair of models for each: another seed or split), each
    with its paired 95 % interval and whether that leaves out 0.

    The interval draws at two levels, so that it holds the noise of training and of the
    images alike: the repeats with replacement, then the people of each repeat drawn. With
    one repeat it is the bootstrap by person."""
    repeats = [_paired(first, second) for first, second in pairs]
    draws = [group_resamples(groups, resamples, seed=k) for k, (*_, groups) in enumerate(repeats)]
    picks = np.random.default_rng(0).integers(0, len(repeats), (resamples, len(repeats)))
    out: dict = {"repeats": len(repeats), "images": sum(len(y) for y, *_ in repeats)}
    for name, difference in DIFFERENCES.items():

        def at(k: int, rows: np.ndarray | slice, difference=difference) -> float:
            y, a, b, _ = repeats[k]
            return difference(y[rows], a[rows], b[rows])

        low, high = percentile_interval(
            [np.mean([at(k, draws[k][n]) for k in picks[n]]) for n in range(resamples)]
        )
        out[name] = {
            "value": float(np.mean([at(k, slice(None)) for k in range(len(repeats))])),
            "interval": [low, high],
            "beyond_noise": bool(low > 0 or high < 0),
        }
    return out
