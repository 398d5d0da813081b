"""Batched inference with a checkpoint's own preprocessing, temperature and optional flip TTA.
Knows nothing of the database: samples in, probabilities out."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.data import FundusDataset, Sample, create_loader
from engine.preprocess import PreprocessConfig

# (images done, images in all, images per second)
OnBatch = Callable[[int, int, float], None]


@dataclass
class Predictions:
    indices: list[int] = field(default_factory=list)  # into the samples given
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    failures: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)

    @property
    def grades(self) -> np.ndarray:
        return self.probs.argmax(1)


def default_batch_size(device: torch.device) -> int:
    """On CPUs small batches run faster per image (they stay in cache; bench/inference.py)."""
    return 64 if device.type == "cuda" else 8


def dataset_for(meta: dict, samples: Sequence[Sample], cache_root: Path | None) -> FundusDataset:
    """The evaluation dataset exactly as the checkpoint was validated."""
    prep = PreprocessConfig.from_dict(meta["preprocess"])
    return FundusDataset(samples, prep, meta["mean"], meta["std"], cache_root,
                         size=meta["image_size"])


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  tta: bool) -> torch.Tensor:
    """Logits of `images`, averaged with those of their mirror images when `tta`: a fundus
    has no left or right."""
    logits = forward(images)
    return (logits + forward(images.flip(-1))) / 2 if tta else logits


@torch.no_grad()
def predict(model: torch.nn.Module, meta: dict, samples: Sequence[Sample],
            device: torch.device, batch_size: int = 32, workers: int = 1, tta: bool = False,
            cache_root: Path | None = None, on_batch: OnBatch | None = None) -> Predictions:
    """Calibrated class probabilities of every readable sample."""
    cuda = device.type == "cuda"
    # channels_last speeds up convolutions on CPUs (oneDNN) as well as on GPUs.
    model = model.to(device, memory_format=torch.channels_last).eval()
    loader = create_loader(dataset_for(meta, samples, cache_root), batch_size, workers, device)
    temperature = float(meta.get("temperature", 1.0))
    out = Predictions()
    chunks, done, started = [], 0, time.perf_counter()
    for images, _, indices, failed in loader:
        out.failures += failed
        done += len(indices) + len(failed)
        if len(indices):
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = flip_averaged(lambda x: model(x).float(), images, tta)
            chunks.append(torch.softmax(logits / temperature, dim=1).cpu())
            out.indices += indices.tolist()
        if on_batch:
            on_batch(done, len(samples), done / (time.perf_counter() - started))
    if chunks:
        out.probs = torch.cat(chunks).numpy()
    return out
