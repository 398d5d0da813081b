"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks").

One scalar T > 0 divides the logits before the softmax. It is fitted on held-out logits by
minimising the negative log-likelihood; argmax, hence accuracy and QWK, do not change.
"""

import math

import torch
import torch.nn.functional as F

from engine.metrics import expected_calibration_error

T_MIN, T_MAX = 0.05, 20.0


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


def _ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return expected_calibration_error(apply_temperature(logits, temperature).numpy(), labels.numpy())


def calibration_summary(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Fit T and report ECE and NLL before (T = 1) and after, as plain floats."""
    logits, labels = _prepare(logits, labels)
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "ece_before": _ece(logits, labels, 1.0),
        "ece_after": _ece(logits, labels, temperature),
        "nll_before": _nll(logits, labels, 1.0),
        "nll_after": _nll(logits, labels, temperature),
    }
