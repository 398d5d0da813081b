"""The plain fine-tuning loop that the engine's defaults are measured against.

Crop to the field, pad square, resize, random flips; AdamW 1e-3 with a one-cycle schedule;
cross-entropy with square-root inverse-frequency class weights; no validation, no
enhancement, no rotation; the last epoch is the model. Same pretrained start as the engine.
"""

import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset

from engine.data import Sample, class_weights
from engine.images import load_rgb
from engine.models import create_model, model_mean_std
from engine.preprocess import crop_to_eye
from engine.trainer import epochs_for_budget

TIMING_STEPS = 6  # run at the schedule's starting lr while the budget is measured


class Photos(Dataset):
    def __init__(self, samples: Sequence[Sample], size: int, mean, std, flips: bool):
        self.samples, self.size, self.flips = list(samples), size, flips
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = cv2.resize(crop_to_eye(load_rgb(Path(self.samples[i].path))), (self.size, self.size),
                           interpolation=cv2.INTER_AREA)
        image = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        if self.flips:
            image = T.RandomVerticalFlip()(T.RandomHorizontalFlip()(image))
        return (image - self.mean) / self.std, self.samples[i].grade or 0


def train_reference(model_name: str, train: Sequence[Sample], minutes: float, size: int = 320,
                    batch_size: int = 16, lr: float = 1e-3, seed: int = 0) -> torch.nn.Module:
    """Fine-tune `model_name` from its ImageNet weights for as many epochs as fit `minutes`."""
    torch.manual_seed(seed)
    model = create_model(model_name, pretrained=True).to(memory_format=torch.channels_last)
    mean, std = model_mean_std(model_name)
    loader = DataLoader(Photos(train, size, mean, std, flips=True), batch_size, shuffle=True,
                        drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr / 25)  # one-cycle's first lr
    weights = class_weights(train, power=0.5)
    schedule, step = None, 0
    model.train()
    while schedule is None or step < schedule.total_steps + TIMING_STEPS:
        for images, labels in loader:
            if step == 1:
                started = time.perf_counter()
            if step == TIMING_STEPS:  # epochs now follow from the measured seconds per step
                per_step = (time.perf_counter() - started) / (TIMING_STEPS - 1)
                epochs = epochs_for_budget(minutes, 0, per_step * len(loader))
                schedule = torch.optim.lr_scheduler.OneCycleLR(
                    optimizer, lr, total_steps=epochs * len(loader) - TIMING_STEPS)
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)),
                                   labels, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if schedule is not None:
                if step >= schedule.total_steps + TIMING_STEPS:
                    break
                schedule.step()
    return model.eval()


@torch.no_grad()
def reference_logits(model: torch.nn.Module, model_name: str, samples: Sequence[Sample],
                     size: int = 320) -> np.ndarray:
    mean, std = model_mean_std(model_name)
    loader = DataLoader(Photos(samples, size, mean, std, flips=False), batch_size=16)
    return torch.cat([model(images.contiguous(memory_format=torch.channels_last))
                      for images, _ in loader]).numpy()
