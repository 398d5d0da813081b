"""Batched inference with a checkpoint's own preprocessing, temperature and optional flip TTA.
Knows nothing of the database: samples in, probabilities out."""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.data import FundusDataset, Sample, create_loader
from engine.preprocess import PreprocessConfig


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


# What view_logits returns, in order.
FLIP_VIEWS = ("image", "mirror image")


def view_logits(forward: Callable[[torch.Tensor], torch.Tensor],
                images: torch.Tensor) -> list[torch.Tensor]:
    """Logits of `images` and of their mirror images (FLIP_VIEWS): a fundus has no left or
    right, so a model should grade both alike."""
    return [forward(images), forward(images.flip(-1))]


def flip_averaged(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  tta: bool) -> torch.Tensor:
    """Logits of `images`, averaged over their flip views when `tta`."""
    if not tta:
        return forward(images)
    image, mirrored = view_logits(forward, images)
    return (image + mirrored) / 2


def calibrated(logits: torch.Tensor, meta: dict) -> torch.Tensor:
    """Class probabilities with the checkpoint's temperature."""
    return torch.softmax(logits / float(meta.get("temperature", 1.0)), dim=-1)


@torch.no_grad()
def view_probabilities(model: torch.nn.Module, meta: dict, image: torch.Tensor) -> np.ndarray:
    """Calibrated probabilities of one image (CHW, as dataset_for gives it) and of its mirror
    image: (2, classes), the spread that flip TTA averages away."""
    return calibrated(torch.cat(view_logits(model, image[None])), meta).numpy()


@torch.no_grad()
def predict_batches(model: torch.nn.Module, meta: dict, samples: Sequence[Sample],
                    device: torch.device, batch_size: int = 32, workers: int = 1,
                    tta: bool = False, cache_root: Path | None = None) -> Iterator[Predictions]:
    """Calibrated class probabilities of every readable sample, one batch at a time as it is
    made (indices into `samples`), so that a caller can keep each before the next."""
    cuda = device.type == "cuda"
    # channels_last speeds up convolutions on CPUs (oneDNN) as well as on GPUs.
    model = model.to(device, memory_format=torch.channels_last).eval()
    loader = create_loader(dataset_for(meta, samples, cache_root), batch_size, workers, device)
    for images, _, indices, failed in loader:
        batch = Predictions(indices.tolist(), failures=list(failed))
        if len(indices):
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = flip_averaged(lambda x: model(x).float(), images, tta)
            batch.probs = calibrated(logits, meta).cpu().numpy()
        yield batch


def predict(model: torch.nn.Module, meta: dict, samples: Sequence[Sample],
            device: torch.device, batch_size: int = 32, workers: int = 1, tta: bool = False,
            cache_root: Path | None = None) -> Predictions:
    """Calibrated class probabilities of every readable sample, all at once."""
    out, chunks = Predictions(), []
    for batch in predict_batches(model, meta, samples, device, batch_size, workers, tta,
                                 cache_root):
        out.indices += batch.indices
        out.failures += batch.failures
        chunks.append(batch.probs)
    if chunks:
        out.probs = np.concatenate(chunks)
    return out
