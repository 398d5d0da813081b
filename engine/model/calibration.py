"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits before the softmax. It is fitted on held-out logits by
minimising the negative log-likelihood; argmax, hence accuracy and QWK, do not change.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from engine.model.metrics import confident_share, expected_calibration_error
from grades import REVIEW_THRESHOLD

# A well-trained network is rarely more than a few times over- or under-confident; a fit
# beyond these says that the validation set is too small or the model has not learned.
T_MIN, T_MAX = 0.25, 4.0
RELIABILITY_BINS = 10


def _prepare(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A one-parameter fit is cheap, so run it on CPU in float64 for a stable line search.
    logits = logits.detach().to("cpu", torch.float64)
    labels = labels.detach().to("cpu", torch.int64).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.numel():
        raise ValueError(
            f"logits must be (n, classes) matching {labels.numel()} labels, got {tuple(logits.shape)}"
        )
    return logits, labels


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T in [T_MIN, T_MAX] minimising NLL of softmax(logits / T); 1.0 when there are no samples."""
    logits, labels = _prepare(logits, labels)
    if labels.numel() == 0:
        return 1.0
    # Optimising log T keeps T positive without a constraint; clamping inside the loss stops
    # a separable set from pushing T towards 0 (or an ambiguous one towards infinity).
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    bounds = (math.log(T_MIN), math.log(T_MAX))
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(*bounds).exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = math.exp(log_t.detach().clamp(*bounds).item())
    return temperature if math.isfinite(temperature) else 1.0


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated class probabilities softmax(logits / T) along the last dimension."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits / temperature, dim=-1)


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return F.cross_entropy(logits / temperature, labels).item() if labels.numel() else 0.0


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS) -> list[dict]:
    """Per equal-width confidence bin (lo, hi]: images, mean confidence and accuracy; the
    points of a reliability diagram (empty bins are left out)."""
    probs, labels = np.asarray(probs), np.asarray(labels).ravel()
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return [
        {
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "count": int((which == b).sum()),
            "confidence": float(confidence[which == b].mean()),
            "accuracy": float(correct[which == b].mean()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def calibration_summary(
    logits: torch.Tensor, labels: torch.Tensor, folds: np.ndarray, threshold: float = REVIEW_THRESHOLD
) -> dict:
    """Fit T on all of the held-out logits, and judge it honestly by cross-fitting: each of
    the two `folds` (0/1 per image, e.g. by person) is calibrated with the T fitted on the
    other, so that no image is scored with a temperature it helped fit. Reports ECE, NLL and
    the reliability diagram before (T = 1) and after, and how many images reach `threshold`
    after calibration and how many of those are right."""
    logits, labels = _prepare(logits, labels)
    folds = np.asarray(folds).ravel()
    temperature = fit_temperature(logits, labels)
    crossed = torch.empty_like(logits)
    for fold in (0, 1):
        mine, other = torch.from_numpy(folds == fold), torch.from_numpy(folds != fold)
        fold_t = fit_temperature(logits[other], labels[other]) if other.any() else temperature
        crossed[mine] = logits[mine] / fold_t
    before = apply_temperature(logits, 1.0).numpy()
    after = apply_temperature(crossed, 1.0).numpy()
    confident, right = confident_share(after, labels.numpy(), threshold)
    return {
        "temperature": temperature,
        "bounded": not T_MIN < temperature < T_MAX,
        "images": int(labels.numel()),
        "ece_before": expected_calibration_error(before, labels.numpy()),
        "ece_after": expected_calibration_error(after, labels.numpy()),
        "nll_before": _nll(logits, labels, 1.0),
        "nll_after": _nll(crossed, labels, 1.0),
        "reliability_before": reliability(before, labels.numpy()),
        "reliability_after": reliability(after, labels.numpy()),
        "threshold": threshold,
        "confident": confident,
        "confident_right": right,
    }


def confident_at(calibration: dict, threshold: float) -> tuple[float, int, int] | None:
    """(threshold, validation images at or above it after calibration, how many of those were
    right) from a stored calibration_summary: exact at the threshold it was measured at, else
    from the reliability bins when `threshold` is one of their lower edges, else at the
    measured threshold. None when the summary holds neither (a run from before they were
    stored)."""
    measured = calibration.get("threshold", REVIEW_THRESHOLD)
    exact = None
    if "confident" in calibration and "confident_right" in calibration:
        exact = measured, calibration["confident"], calibration["confident_right"]
    if exact and math.isclose(threshold, measured):
        return exact
    bins = calibration.get("reliability_after")
    steps = threshold * RELIABILITY_BINS
    if bins and threshold < 1 and math.isclose(steps, round(steps), abs_tol=1e-6):
        # A bin holds the confidences in (lo, hi]: those above an edge are whole bins.
        above = [b for b in bins if b["lo"] > threshold - 1e-6]
        return (
            threshold,
            sum(b["count"] for b in above),
            round(sum(b["count"] * b["accuracy"] for b in above)),
        )
    return exact
