"""A run's screening figures: its validation probabilities, the operating point for referable
DR chosen on them (an admin may choose another target sensitivity), and whether two runs
differ by more than the noise of the validation images.

The probabilities are those of the model that was validated: the run's own, or with
--refit that of its validation phase, whose temperature and operating point the run took.
"""

from pathlib import Path

import numpy as np

from engine.data.datasets import Sample, person_halves, read_probabilities
from engine.model.metrics import (
    REFERABLE,
    group_resamples,
    interval,
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


def paired_difference(
    first: tuple[list[Sample], np.ndarray], second: tuple[list[Sample], np.ndarray]
) -> dict:
    """QWK and referable AUC of the first run minus the second's on the validation images both
    were judged on, each with its paired 95 % interval by person, and whether the interval
    leaves out 0 (the difference is larger than the noise)."""
    theirs = {s.path: row for s, row in zip(*second, strict=True)}
    shared = [n for n, s in enumerate(first[0]) if s.path in theirs]
    samples = [first[0][n] for n in shared]
    a = first[1][shared]
    b = np.array([theirs[s.path] for s in samples]).reshape(-1, 4)
    labels = np.array([s.grade for s in samples])
    statistics = {
        "qwk": lambda i: (
            quadratic_weighted_kappa(labels[i], a[i].argmax(1))
            - quadratic_weighted_kappa(labels[i], b[i].argmax(1))
        ),
        "referable_auc": lambda i: (
            roc_auc(labels[i] >= REFERABLE, referable_score(a[i]))
            - roc_auc(labels[i] >= REFERABLE, referable_score(b[i]))
        ),
    }
    draws = group_resamples([s.group for s in samples])
    out: dict = {"images": len(samples)}
    for name, statistic in statistics.items():
        low, high = interval(statistic, draws)
        out[name] = {
            "value": statistic(np.arange(len(samples))),
            "interval": [low, high],
            "beyond_noise": bool(low > 0 or high < 0),
        }
    return out
