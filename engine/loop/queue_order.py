"""The order in which review candidates reach the reviewers, from their predictions alone.

Each order ranks candidates by a key, smallest first, ties by position, so that any caller (the
loop-gain measurement, the app's queue) gets the same order from the same probabilities:
- confidence: least confident first (the Review page's default order today);
- random: a fixed shuffle per seed, the yardstick every other order is measured against;
- margin: smallest gap between the two most probable grades first;
- flip: largest disagreement among the test-time views first (the image and its mirror image,
  and their quarter turns with 8 views; as grades expected from each view);
- cost: largest expected quadratic cost of accepting the predicted grade first, the error that
  quadratic-weighted kappa punishes: a 0 with a quarter of its mass on 3 before one with it on 1.
"""

from collections.abc import Callable

import numpy as np


def expected_grades(probs: np.ndarray) -> np.ndarray:
    """The mean grade under each row's probabilities (any leading shape)."""
    return probs @ np.arange(probs.shape[-1])


def _confidence(probs: np.ndarray, views: np.ndarray | None, seed: int) -> np.ndarray:
    return probs.max(1)


def _random(probs: np.ndarray, views: np.ndarray | None, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(probs))


def _margin(probs: np.ndarray, views: np.ndarray | None, seed: int) -> np.ndarray:
    top = np.sort(probs, 1)
    return top[:, -1] - top[:, -2]


def _flip(probs: np.ndarray, views: np.ndarray | None, seed: int) -> np.ndarray:
    if not len(probs):
        return np.zeros(0)
    if views is None or views.shape[1] < 2:
        raise ValueError(
            "the order 'flip' needs the probabilities of at least two flip views (predict with TTA)"
        )
    return -np.ptp(expected_grades(views), axis=1)


def _cost(probs: np.ndarray, views: np.ndarray | None, seed: int) -> np.ndarray:
    distance = np.arange(probs.shape[1])[None, :] - probs.argmax(1)[:, None]
    return -(probs * distance**2).sum(1)


KEYS: dict[str, Callable[[np.ndarray, np.ndarray | None, int], np.ndarray]] = {
    "confidence": _confidence,
    "random": _random,
    "margin": _margin,
    "flip": _flip,
    "cost": _cost,
}
ORDERS = tuple(KEYS)


def queue_order(name: str, probs: np.ndarray, views: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Positions of the candidates (rows of `probs`, (n, classes)) in the order `name`, the
    first to review first. `views` (n, 2, classes) holds each flip view's probabilities, which
    the order 'flip' needs; `seed` fixes the order 'random'."""
    if name not in KEYS:
        raise ValueError(f"unknown queue order {name!r}; choose one of {', '.join(ORDERS)}")
    probs = np.asarray(probs, dtype=np.float64)
    return np.argsort(KEYS[name](probs, views, seed), kind="stable")
