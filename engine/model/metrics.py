"""Grading metrics: confusion matrix, quadratic weighted kappa, precision/recall, calibration error.

numpy only, so scikit-learn is not needed. Everything returned by `classification_report`
is a plain Python type, ready to be stored as JSON.
"""

import numpy as np


def _as_labels(y: np.ndarray | list[int], num_classes: int) -> np.ndarray:
    labels = np.asarray(y, dtype=np.int64).ravel()
    # Out-of-range grades would silently land in the wrong cell of the flattened bincount.
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return labels


def confusion_matrix(y_true, y_pred, num_classes: int = 4) -> np.ndarray:
    """Counts of (true, predicted) pairs: rows are true grades, columns predicted grades."""
    true = _as_labels(y_true, num_classes)
    pred = _as_labels(y_pred, num_classes)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels, y_pred has {pred.size}")
    flat = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int = 4) -> float:
    """Cohen's kappa with quadratic weights (the Kaggle APTOS 2019 metric).

    kappa = 1 - sum(W * O) / sum(W * E), with O the confusion matrix, E the outer product of
    the true and predicted label histograms divided by n, and W[i, j] = (i - j)^2 / (K - 1)^2.

    When sum(W * E) is 0 (no samples, or true and predicted labels all one and the same
    class) kappa is undefined; we return 0.0 rather than NaN so that it can be logged,
    averaged and stored as JSON. This is a convention: scikit-learn returns NaN there.
    """
    observed = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    n = observed.sum()
    if n == 0:
        return 0.0
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / n
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2 / max(num_classes - 1, 1) ** 2
    denominator = float((weights * expected).sum())
    if denominator == 0.0:
        return 0.0
    return 1.0 - float((weights * observed).sum()) / denominator


def _safe_ratio(numerators: np.ndarray, denominators: np.ndarray) -> list[float]:
    ratios = np.divide(numerators, denominators, out=np.zeros(len(numerators)), where=denominators > 0)
    return [float(r) for r in ratios]


def per_class_precision_recall(cm: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-class precision (over columns) and recall (over rows); 0.0 where a class is never
    predicted, respectively never present."""
    cm = np.asarray(cm, dtype=np.float64)
    hits = np.diag(cm)
    return _safe_ratio(hits, cm.sum(axis=0)), _safe_ratio(hits, cm.sum(axis=1))


def classification_report(y_true, y_pred, num_classes: int = 4) -> dict:
    """Accuracy, QWK, per-class precision and recall and the confusion matrix, as JSON-ready types."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    total = int(cm.sum())
    precision, recall = per_class_precision_recall(cm)
    return {
        "accuracy": float(np.trace(cm)) / total if total else 0.0,
        "qwk": quadratic_weighted_kappa(y_true, y_pred, num_classes),
        "precision": precision,
        "recall": recall,
        "confusion": cm.tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE over equal-width confidence bins (Guo et al. 2017).

    probs is (n, num_classes) with rows summing to 1. Each bin is (lo, hi]; a confidence of
    exactly 0 goes to the first bin. Returns 0.0 for no samples.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).ravel()
    if probs.ndim != 2 or probs.shape[0] != labels.size:
        raise ValueError(f"probs must be (n, classes) matching {labels.size} labels, got {probs.shape}")
    if labels.size == 0:
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    # Per bin, |accuracy - mean confidence| * count / n is |sum(correct) - sum(confidence)| / n.
    gap = np.abs(
        np.bincount(bins, weights=correct, minlength=n_bins)
        - np.bincount(bins, weights=confidence, minlength=n_bins)
    )
    return float(gap.sum() / labels.size)


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (Mann-Whitney U). NaN when either class is absent."""
    positive = np.asarray(positive, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share the mean of their ranks.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sensitivity_at_specificity(positive: np.ndarray, scores: np.ndarray, specificity: float = 0.9) -> float:
    """Share of positives flagged at the strictest threshold that keeps at least
    `specificity` of the negatives below it. NaN when either class is absent."""
    positive = np.asarray(positive, dtype=bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    negatives, positives = np.sort(scores[~positive]), scores[positive]
    if len(negatives) == 0 or len(positives) == 0:
        return float("nan")
    # The smallest threshold t with share(negatives < t) >= specificity; flag scores >= t.
    index = int(np.ceil(specificity * len(negatives))) - 1
    threshold = np.nextafter(negatives[max(index, 0)], np.inf)
    return float((positives >= threshold).mean())


REFERABLE = 2  # grade 2 (moderate) and above: refer to an ophthalmologist


def referable_score(probs: np.ndarray) -> np.ndarray:
    """The probability of referable DR: the mass on grades 2 and above."""
    return np.asarray(probs)[:, REFERABLE:].sum(axis=1)


def confident_share(probs: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[int, int]:
    """(images whose top probability reaches `threshold`, how many of those are right)."""
    probs, labels = np.asarray(probs), np.asarray(labels).ravel()
    confident = probs.max(axis=1) >= threshold
    right = probs.argmax(axis=1) == labels
    return int(confident.sum()), int((confident & right).sum())


def grading_summary(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """What a grader is judged on: QWK, accuracy, referable-DR AUC and sensitivity at 90 %
    specificity, calibration error, and the confident share with its accuracy."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels).ravel()
    referable, score = labels >= REFERABLE, referable_score(probs)
    confident, right = confident_share(probs, labels, threshold)
    report = classification_report(labels, probs.argmax(axis=1))
    return {
        "images": int(labels.size),
        "qwk": report["qwk"],
        "accuracy": report["accuracy"],
        "referable_auc": roc_auc(referable, score),
        "sens_at_90_spec": sensitivity_at_specificity(referable, score, 0.9),
        "ece": expected_calibration_error(probs, labels),
        "confident": confident,
        "confident_right": right,
    }


# -- screening figures and their intervals ----------------------------------------------------

# The first autonomous DR system cleared in the US reported 87.2 % sensitivity: the default
# operating point is the most specific one that keeps at least this.
TARGET_SENSITIVITY = 0.87
RESAMPLES = 1000


def operating_point(
    positive: np.ndarray, scores: np.ndarray, sensitivity: float = TARGET_SENSITIVITY
) -> float:
    """The highest threshold (so the highest specificity) at which flagging scores >= it
    keeps at least `sensitivity` of the positives; NaN without positives."""
    flagged = np.sort(np.asarray(scores, np.float64)[np.asarray(positive, bool)])[::-1]
    if len(flagged) == 0:
        return float("nan")
    return float(flagged[max(int(np.ceil(sensitivity * len(flagged))) - 1, 0)])


def sensitivity_specificity(positive: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    """(share of positives flagged, share of negatives not flagged); NaN where a class is absent."""
    positive, flagged = np.asarray(positive, bool), np.asarray(flagged, bool)

    def share(mask: np.ndarray, values: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    return share(positive, flagged), share(~positive, ~flagged)


def group_resamples(groups: list | np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Index arrays of `resamples` bootstrap samples that draw whole groups (people) with
    replacement, so that two eyes of one person count as the one draw they are. Images
    without a group (None) are groups of their own."""
    keys = [g if g is not None else ("\0", n) for n, g in enumerate(groups)]
    members: dict = {}
    for n, key in enumerate(keys):
        members.setdefault(key, []).append(n)
    blocks = [np.array(m) for m in members.values()]
    rng = np.random.default_rng(seed)
    return [
        np.concatenate([blocks[b] for b in rng.integers(0, len(blocks), len(blocks))])
        for _ in range(resamples)
    ]


def interval(statistic, samples: list[np.ndarray], level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over the resamples (NaN draws, such as an
    AUC of a draw without positives, left out)."""
    return percentile_interval([statistic(indices) for indices in samples], level)


def with_interval(figure: dict | None, form: str = ".3f") -> str:
    """A figure of screening_summary or a difference: "0.812 [0.774, 0.845]"; "-" for none."""
    if figure is None or not np.isfinite(figure["value"]):
        return "-"
    low, high = figure["interval"]
    return f"{figure['value']:{form}} [{low:{form}}, {high:{form}}]"


def percentile_interval(draws, level: float = 0.95) -> tuple[float, float]:
    """The central `level` of bootstrap draws, the NaN ones left out."""
    values = np.asarray(draws, np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def screening_summary(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: list,
    threshold: float,
    flagged: np.ndarray | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict:
    """QWK, referable AUC, and sensitivity and specificity for referable DR at `threshold`
    (flagged when P(grade >= 2) >= it, unless `flagged` says otherwise), each with its 95 %
    bootstrap interval by person."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels).ravel()
    grades, score, positive = probs.argmax(1), referable_score(probs), labels >= REFERABLE
    flagged = score >= threshold if flagged is None else np.asarray(flagged, bool)
    statistics = {
        "qwk": lambda i: quadratic_weighted_kappa(labels[i], grades[i]),
        "referable_auc": lambda i: roc_auc(positive[i], score[i]),
        "sensitivity": lambda i: sensitivity_specificity(positive[i], flagged[i])[0],
        "specificity": lambda i: sensitivity_specificity(positive[i], flagged[i])[1],
    }
    if not np.isfinite(threshold):  # no operating point: a model without validation
        del statistics["sensitivity"], statistics["specificity"]
    draws = group_resamples(groups, resamples, seed)
    everything = np.arange(len(labels))
    return {
        "images": int(len(labels)),
        "threshold": float(threshold),
        **{
            name: {"value": statistic(everything), "interval": list(interval(statistic, draws))}
            for name, statistic in statistics.items()
        },
    }


def validation_screening(
    probs: np.ndarray,
    labels: np.ndarray,
    groups: list,
    folds: np.ndarray,
    sensitivity: float = TARGET_SENSITIVITY,
) -> dict:
    """The operating point chosen on validation probabilities, with figures that do not flatter
    it: each of the two `folds` (by person) is judged at the point chosen on the other, and
    the intervals are drawn by person. `threshold` is the point chosen on all of them."""
    probs, labels, folds = np.asarray(probs), np.asarray(labels).ravel(), np.asarray(folds)
    score, positive = referable_score(probs), labels >= REFERABLE
    flagged = np.zeros(len(labels), bool)
    for fold in np.unique(folds):
        other = folds != fold
        chooser = other if positive[other].any() else np.ones(len(labels), bool)
        point = operating_point(positive[chooser], score[chooser], sensitivity)
        flagged[folds == fold] = score[folds == fold] >= point
    threshold = operating_point(positive, score, sensitivity)
    return {
        **screening_summary(probs, labels, groups, threshold, flagged),
        "target_sensitivity": sensitivity,
        "cross_fitted": True,
    }
