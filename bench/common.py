"""Shared set-up for the benchmarks: realistic-size synthetic photographs and timing."""

import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from engine.data.datasets import Sample
from engine.data.synth import write_dataset

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"  # never in the repository
REPEATS = 3  # each figure is the best of these, so a busy moment elsewhere does not count


def photographs(out: Path, count: int, size: int) -> list[Sample]:
    """`count` synthetic APTOS-style photographs `size` pixels high (2-4 Mpx at 1536)."""
    write_dataset(out, seed=1, n_train=0, n_test=count, n_val=0, n_messidor=0, size=size)
    return [Sample(str(p), None, p.stem) for p in sorted((out / "aptos" / "test_images").iterdir())]


def read_bgr(path: Path) -> np.ndarray:
    """The image as OpenCV decodes it (BGR); an error where cv2.imread would return None."""
    img = cv2.imread(str(path))
    if img is None:
        raise OSError(f"OpenCV cannot read {path}")
    return img


def rate(count: int, work: Callable[[int], object]) -> float:
    """Best items per second over REPEATS calls of `work(repeat)`, each handling `count` items."""
    best = float("inf")
    for repeat in range(REPEATS):
        started = time.perf_counter()
        work(repeat)
        best = min(best, time.perf_counter() - started)
    return count / best
