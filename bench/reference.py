"""The plain fine-tuning loop that the engine's defaults are measured against.

Crop to the field, pad square, resize, random flips; AdamW 1e-3 with a one-cycle schedule;
cross-entropy with square-root inverse-frequency class weights; no validation, no
enhancement, no rotation; the weights at the end of the budget are the model. Same
pretrained start as the engine. Each photograph is decoded and cropped once and kept in
memory, as the engine keeps its preprocessing cache, so that the budget goes to training.
"""

import math
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset

from engine.data.datasets import Sample, class_weights
from engine.data.images import load_rgb
from engine.data.preprocess import crop_to_eye
from engine.model.networks import create_model, model_mean_std
from engine.model.predictor import tta_logits


class Photos(Dataset):
    def __init__(self, samples: Sequence[Sample], size: int, mean, std, flips: bool):
        self.samples, self.size, self.flips = list(samples), size, flips
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.decoded: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if i not in self.decoded:
            self.decoded[i] = cv2.resize(
                crop_to_eye(load_rgb(Path(self.samples[i].path))),
                (self.size, self.size),
                interpolation=cv2.INTER_AREA,
            )
        image = torch.from_numpy(self.decoded[i]).permute(2, 0, 1).float() / 255
        if self.flips:
            image = T.RandomVerticalFlip()(T.RandomHorizontalFlip()(image))
        return (image - self.mean) / self.std, self.samples[i].grade or 0


def one_cycle(progress: float, lr: float) -> tuple[float, float]:
    """(lr, Adam beta1) of PyTorch's OneCycleLR at `progress` in [0, 1] of the run: cosine
    from lr/25 up to lr over the first 30 %, then down to lr/25e4; beta1 mirrors it."""

    def cosine(a: float, b: float, share: float) -> float:
        return b + (a - b) * (1 + math.cos(math.pi * share)) / 2

    if progress < 0.3:
        share = progress / 0.3
        return cosine(lr / 25, lr, share), cosine(0.95, 0.85, share)
    share = min((progress - 0.3) / 0.7, 1.0)
    return cosine(lr, lr / 25e4, share), cosine(0.85, 0.95, share)


def train_reference(
    model_name: str,
    train: Sequence[Sample],
    minutes: float,
    size: int = 320,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    pretrained: bool | str = True,
) -> torch.nn.Module:
    """Fine-tune `model_name` from its ImageNet weights for exactly `minutes` of training.

    The one-cycle schedule runs on the clock rather than on a step count fixed up front, so
    that the loop uses its whole budget whatever the speed of its first steps."""
    torch.manual_seed(seed)
    model = create_model(model_name, pretrained=pretrained).to(memory_format=torch.channels_last)
    mean, std = model_mean_std(model_name)
    loader = DataLoader(Photos(train, size, mean, std, flips=True), batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    weights = class_weights(train, power=0.5)
    budget_s, started = minutes * 60, time.perf_counter()
    model.train()
    while (progress := (time.perf_counter() - started) / budget_s) < 1:
        for images, labels in loader:
            step_lr, beta1 = one_cycle(progress, lr)
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = step_lr, (beta1, group["betas"][1])
            loss = F.cross_entropy(
                model(images.contiguous(memory_format=torch.channels_last)), labels, weight=weights
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (progress := (time.perf_counter() - started) / budget_s) >= 1:
                break
    return model.eval()


@torch.no_grad()
def reference_probs(
    model: torch.nn.Module, model_name: str, samples: Sequence[Sample], views: int = 1, size: int = 320
) -> np.ndarray:
    """Class probabilities, averaged over `views` test-time views as the engine averages them."""
    mean, std = model_mean_std(model_name)
    loader = DataLoader(Photos(samples, size, mean, std, flips=False), batch_size=16)

    def forward(images: torch.Tensor) -> torch.Tensor:
        return model(images.contiguous(memory_format=torch.channels_last))

    return torch.cat([torch.softmax(tta_logits(forward, images, views), 1) for images, _ in loader]).numpy()
