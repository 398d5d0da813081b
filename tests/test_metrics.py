"""Metrics against hand-computed values, and temperature scaling on synthetic logits."""

import json
import math

import numpy as np
import pytest
import torch

from engine.model.calibration import apply_temperature, calibration_summary, fit_temperature, reliability
from engine.model.metrics import (
    classification_report,
    confident_share,
    confusion_matrix,
    expected_calibration_error,
    grading_summary,
    group_resamples,
    operating_point,
    per_class_precision_recall,
    quadratic_weighted_kappa,
    referable_score,
    roc_auc,
    screening_summary,
    sensitivity_at_specificity,
    sensitivity_specificity,
    validation_screening,
)

# --- quadratic weighted kappa ---------------------------------------------------------------


def test_qwk_perfect_agreement_is_one():
    y = [0, 1, 2, 3, 3, 1, 0]
    assert quadratic_weighted_kappa(y, y) == pytest.approx(1.0)


def test_qwk_hand_computed_example():
    # y_true = [0, 1, 2, 3], y_pred = [0, 2, 2, 3]; K = 4, W[i, j] = (i - j)^2 / 9.
    # Only mistake is (1 -> 2): sum(W * O) = 1/9.
    # Histograms: true [1, 1, 1, 1], pred [1, 0, 2, 1], n = 4, E[i, j] = true_i * pred_j / 4.
    # sum(W * E) = 1/36 * sum_i [(i-0)^2 + 2 (i-2)^2 + (i-3)^2] = (17 + 7 + 5 + 11) / 36 = 40/36.
    # kappa = 1 - (1/9) / (40/36) = 1 - 4/40 = 0.9.
    assert quadratic_weighted_kappa([0, 1, 2, 3], [0, 2, 2, 3]) == pytest.approx(0.9)


def test_qwk_is_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    assert quadratic_weighted_kappa(a, b) == pytest.approx(quadratic_weighted_kappa(b, a))


def test_qwk_reversed_prediction_is_negative():
    # sum(W * O) = (9 + 1 + 1 + 9) / 9 = 80/36 and sum(W * E) = 40/36, so kappa = -1 exactly.
    assert quadratic_weighted_kappa([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)


def test_qwk_penalises_far_errors_more_than_near_ones():
    y_true = [0, 1, 2, 3] * 5
    near = quadratic_weighted_kappa(y_true, [0, 1, 2, 2] * 5)
    far = quadratic_weighted_kappa(y_true, [0, 1, 2, 0] * 5)
    assert near > far


def test_qwk_single_class_is_zero_not_nan():
    assert quadratic_weighted_kappa([2, 2, 2], [2, 2, 2]) == 0.0
    assert quadratic_weighted_kappa([], []) == 0.0
    # Constant truth with varied predictions: O equals E, so kappa is 0 by the formula itself.
    assert quadratic_weighted_kappa([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)


def test_labels_out_of_range_or_mismatched_raise():
    with pytest.raises(ValueError):
        confusion_matrix([0, 4], [0, 1])
    with pytest.raises(ValueError):
        confusion_matrix([0, 1, 2], [0, 1])


# --- confusion, precision, recall -----------------------------------------------------------

Y_TRUE = [0, 0, 1, 1, 2, 3]
Y_PRED = [0, 1, 1, 1, 3, 3]


def test_confusion_matrix_hand_example():
    expected = [
        [1, 1, 0, 0],
        [0, 2, 0, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 1],
    ]
    np.testing.assert_array_equal(confusion_matrix(Y_TRUE, Y_PRED), expected)


def test_precision_recall_hand_example():
    precision, recall = per_class_precision_recall(confusion_matrix(Y_TRUE, Y_PRED))
    # Grade 2 is never predicted, so its precision is undefined and reported as 0.
    assert precision == pytest.approx([1.0, 2 / 3, 0.0, 0.5])
    assert recall == pytest.approx([0.5, 1.0, 0.0, 1.0])


def test_classification_report_is_json_ready():
    report = classification_report(Y_TRUE, Y_PRED)
    assert json.loads(json.dumps(report)) == report
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion"][0] == [1, 1, 0, 0]
    assert set(report) == {"accuracy", "qwk", "precision", "recall", "confusion"}


def test_classification_report_degenerate_has_no_nan():
    for y_true, y_pred in [([1, 1, 1], [1, 1, 1]), ([], [])]:
        report = classification_report(y_true, y_pred)
        values = [report["accuracy"], report["qwk"], *report["precision"], *report["recall"]]
        assert all(math.isfinite(v) for v in values)


# --- expected calibration error -------------------------------------------------------------


def test_ece_of_calibrated_data_is_near_zero():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(4, 0.5), size=20_000)
    # Labels drawn from the predicted distribution make the probabilities calibrated by construction.
    labels = (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1)
    assert expected_calibration_error(probs, labels) < 0.02


def test_ece_of_overconfident_data_is_high():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 1000)
    probs = np.full((1000, 4), 0.01 / 3)
    probs[:, 0] = 0.99  # Always 99 % sure of grade 0, right about a quarter of the time.
    assert expected_calibration_error(probs, labels) > 0.6


def test_ece_hand_example():
    # Both samples fall in the top bin (0.9, 1.0]: mean confidence 0.95, accuracy 0.5.
    probs = np.array([[0.9500001, 0.05, 0, 0], [0.05, 0.9499999, 0, 0]])
    assert expected_calibration_error(probs, np.array([0, 0]), n_bins=10) == pytest.approx(0.45)
    assert expected_calibration_error(np.zeros((0, 4)), np.zeros(0)) == 0.0


# --- temperature scaling --------------------------------------------------------------------


def _calibrated_logits(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a reasonable classifier whose labels are drawn from its own softmax."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, 4, generator=generator)
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def halves(n: int) -> np.ndarray:
    return np.arange(n) % 2


def test_temperature_scaling_fixes_overconfidence():
    logits, labels = _calibrated_logits()
    summary = calibration_summary(3.0 * logits, labels, halves(len(labels)))
    assert summary["temperature"] == pytest.approx(3.0, rel=0.15) and not summary["bounded"]
    assert summary["ece_after"] < summary["ece_before"]
    assert summary["nll_after"] < summary["nll_before"]


def test_calibration_is_judged_on_folds_it_was_not_fitted_on():
    """Two folds whose models err in opposite directions: the temperature fitted on one does
    not suit the other, and the cross-fitted error says so, where fitting on all hides it."""
    logits, labels = _calibrated_logits(n=2000)
    folds = halves(len(labels))
    scaled = torch.where(torch.from_numpy(folds == 0)[:, None], 3.0 * logits, logits / 3.0)
    summary = calibration_summary(scaled, labels, folds)
    fitted_on_all = expected_calibration_error(
        apply_temperature(scaled, summary["temperature"]).numpy(), labels.numpy()
    )
    assert summary["ece_after"] > fitted_on_all + 0.05


def test_a_temperature_past_the_sane_bounds_is_clipped_and_said():
    logits, labels = _calibrated_logits()
    summary = calibration_summary(20.0 * logits, labels, halves(len(labels)))
    assert summary["temperature"] == pytest.approx(4.0) and summary["bounded"]


def test_reliability_bins_and_the_confident_share():
    probs = np.array([[0.95, 0.05, 0, 0], [0.9, 0.1, 0, 0], [0.2, 0.75, 0.05, 0], [0.4, 0.3, 0.3, 0]])
    labels = np.array([0, 1, 1, 2])
    bins = reliability(probs, labels, bins=10)
    assert [(b["lo"], b["count"], b["accuracy"]) for b in bins] == [
        (pytest.approx(0.3), 1, 0.0),
        (pytest.approx(0.7), 1, 1.0),
        (pytest.approx(0.8), 1, 0.0),
        (pytest.approx(0.9), 1, 1.0),
    ]
    assert confident_share(probs, labels, 0.70) == (3, 2)


# --- referable DR: ROC AUC and sensitivity at a specificity ---------------------------------


def test_roc_auc_hand_examples():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_sensitivity_at_specificity_uses_the_strictest_threshold_that_keeps_it():
    negatives = np.linspace(0, 0.9, 10)  # 0.0, 0.1, ..., 0.9
    positives = np.array([0.85, 0.95, 0.5, 0.05])
    positive = np.r_[np.zeros(10), np.ones(4)]
    scores = np.r_[negatives, positives]
    # 90 % specificity: nine of ten negatives (<= 0.8) stay below; flagged: 0.85 and 0.95.
    assert sensitivity_at_specificity(positive, scores, 0.9) == pytest.approx(0.5)
    assert sensitivity_at_specificity(positive, scores, 0.5) == pytest.approx(0.75)


def test_grading_summary_counts_referable_from_grade_two():
    probs = np.array([[0.8, 0.2, 0, 0], [0.1, 0.8, 0.1, 0], [0, 0.1, 0.8, 0.1], [0, 0, 0.2, 0.8]])
    summary = grading_summary(probs, np.array([0, 1, 2, 3]), 0.7)
    assert summary["qwk"] == 1.0 and summary["referable_auc"] == 1.0
    assert summary["confident"] == 4 and summary["confident_right"] == 4
    assert list(referable_score(probs)) == pytest.approx([0, 0.1, 0.9, 1.0])


def test_temperature_of_calibrated_model_is_near_one():
    logits, labels = _calibrated_logits(seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_apply_temperature_keeps_argmax_and_softens():
    logits, _ = _calibrated_logits(n=100)
    probs = apply_temperature(logits, 2.0)
    assert torch.allclose(probs.sum(dim=1), torch.ones(100))
    assert torch.equal(probs.argmax(dim=1), logits.argmax(dim=1))
    assert probs.max(dim=1).values.mean() < torch.softmax(logits, dim=1).max(dim=1).values.mean()
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_calibration_single_class_has_no_nan():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 10)
    summary = calibration_summary(logits, torch.zeros(10, dtype=torch.long), halves(10))
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    assert 0.25 <= summary["temperature"] <= 4.0
    assert fit_temperature(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)) == 1.0


# --- screening: operating point, intervals by person -----------------------------------------


def test_operating_point_is_the_most_specific_that_keeps_the_sensitivity():
    positive = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.65, 0.35, 0.1, 0.05])
    threshold = operating_point(positive, scores, 0.75)  # 6 of 8 positives flagged
    assert threshold == 0.4
    sensitivity, specificity = sensitivity_specificity(positive, scores >= threshold)
    assert sensitivity == 0.75 and specificity == 0.75
    assert operating_point(positive, scores, 1.0) == 0.2
    assert np.isnan(operating_point(np.zeros(3, bool), np.ones(3)))


def test_resamples_draw_whole_people():
    groups = ["a", "a", "b", "b", "c", None, None]
    for indices in group_resamples(groups, resamples=50, seed=1):
        drawn = [groups[i] for i in indices]
        assert drawn.count("a") % 2 == 0 and drawn.count("b") % 2 == 0  # both eyes or neither
        assert len(indices) >= 5  # five draws of one or two images each
    assert all(
        np.array_equal(x, y)
        for x, y in zip(group_resamples(groups, 5, 3), group_resamples(groups, 5, 3), strict=True)
    )


def test_intervals_cover_the_value_and_shrink_with_more_people():
    rng = np.random.default_rng(0)

    def summary(n: int) -> dict:
        labels = rng.integers(0, 4, n)
        probs = np.eye(4)[np.where(rng.random(n) < 0.7, labels, rng.integers(0, 4, n))] * 0.7 + 0.075
        return screening_summary(probs, labels, [f"p{i // 2}" for i in range(n)], 0.5, resamples=300)

    small, large = summary(60), summary(1200)
    for name in ("qwk", "referable_auc", "sensitivity", "specificity"):
        for figures in (small, large):
            low, high = figures[name]["interval"]
            assert low <= figures[name]["value"] <= high
        widths = [f[name]["interval"][1] - f[name]["interval"][0] for f in (large, small)]
        assert widths[0] < widths[1] / 2


def test_validation_screening_judges_each_half_at_the_others_point():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    score = np.clip((labels >= 2) * 0.3 + rng.random(400) * 0.7, 0, 1)
    probs = np.stack([(1 - score) / 2, (1 - score) / 2, score / 2, score / 2], 1)
    folds = np.arange(400) % 2
    result = validation_screening(probs, labels, [str(i) for i in range(400)], folds)
    positive = labels >= 2
    assert result["threshold"] == operating_point(positive, score, 0.87)
    # Chosen on the other half, a half's sensitivity is not forced to 0.87 or above.
    expected = np.zeros(400, bool)
    for fold in (0, 1):
        point = operating_point(positive[folds != fold], score[folds != fold], 0.87)
        expected[folds == fold] = score[folds == fold] >= point
    assert result["sensitivity"]["value"] == sensitivity_specificity(positive, expected)[0]
    assert result["specificity"]["value"] == sensitivity_specificity(positive, expected)[1]
