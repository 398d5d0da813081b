"""The training loop: one function for the CLI, the app's jobs and the tests.

It knows neither streamlit nor the database: it takes samples and a config, writes
checkpoints, TensorBoard scalars and the seed's estimate_info report, and tells a `Hooks`
object about every batch and epoch (the job glue turns those into database rows).
"""

import json
import math
import time
from datetime import datetime
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from engine.calibration import calibration_summary
from engine.data import FundusDataset, Sample, class_counts, class_weights, create_loader
from engine.metrics import classification_report
from engine.models import (create_model, freeze_all_but_classifier, load_checkpoint,
                           model_mean_std, save_checkpoint)
from engine.preprocess import PreprocessConfig
from engine.workspace import Workspace


def run_name(now: datetime | None = None) -> str:
    """A run's name when none is given: the date and time, as the seed named its logs."""
    return (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run stops instead of training on garbage."""


@dataclass
class TrainConfig:
    model: str
    img_size: int  # training size; validation and inference use eval_size
    eval_size: int
    epochs: int = 30
    batch_size: int = 8
    lr: float = 0.01
    lrf: float = 0.01  # the cosine ends at lr * lrf
    optimizer: str = "sgd"  # sgd (momentum 0.9, the seed's) or adamw
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    balance: str = "loss"  # loss (class-weighted), sampler (class-balanced) or none
    progressive: bool = False  # EfficientNetV2: size and regularisation grow over 4 stages
    freeze_layers: bool = False
    pretrained: str | bool = True  # True: offline ImageNet weights; a path; False: random
    drop_rate: float = 0.2
    workers: int = 1
    seed: int = 0
    device: str = "cpu"
    preprocess: dict[str, Any] = field(default_factory=lambda: PreprocessConfig().to_dict())


@dataclass
class RunPaths:
    """Where one run writes: checkpoints, TensorBoard scalars, estimate_info report."""

    name: str
    weights: Path
    tensorboard: Path
    report: Path

    @classmethod
    def under(cls, workspace: Workspace, name: str) -> "RunPaths":
        return cls(name, workspace.weights / name, workspace.runs / name,
                   workspace.estimate_info / f"{name}.txt")

    @property
    def last(self) -> Path:
        return self.weights / "last.pth"

    @property
    def best(self) -> Path:
        return self.weights / "best.pth"

    @property
    def state(self) -> Path:  # optimizer state and counters, for --resume
        return self.weights / "resume.pt"


class Hooks:
    """Callbacks from the loop; raising from one (e.g. on cancel) stops the run."""

    def on_start(self, config: TrainConfig, total_epochs: int) -> None: ...
    def on_batch(self, epoch: int, step: int, steps: int, images_per_s: float) -> None: ...
    def on_epoch(self, record: dict) -> None: ...
    def on_skipped(self, reasons: list[str]) -> None: ...


@dataclass
class TrainResult:
    best_checkpoint: Path
    best_qwk: float
    epochs: list[dict]
    calibration: dict


def lr_at(config: TrainConfig, progress: float) -> float:
    """Linear warm-up, then cosine from lr down to lr * lrf; progress counts epochs."""
    warmup = min(config.warmup_epochs, config.epochs / 5)  # short runs keep most of their epochs
    if progress < warmup:
        return config.lr * (progress + 1e-3) / warmup
    span = max(config.epochs - warmup, 1e-9)
    cosine = (1 + math.cos(math.pi * min((progress - warmup) / span, 1.0))) / 2
    return config.lr * (config.lrf + (1 - config.lrf) * cosine)


def stage_of(config: TrainConfig, epoch: int) -> tuple[int, int, float]:
    """(image size, RandAugment magnitude, dropout) for the epoch under progressive learning."""
    if not config.progressive:
        return config.img_size, 0, config.drop_rate
    stage = min(4 * epoch // max(config.epochs, 1), 3)
    share = stage / 3
    start = min(128, config.img_size // 2)  # the paper's 128 px, or half of a small size
    size = round((start + share * (config.img_size - start)) / 32) * 32
    return min(max(size, 32), config.img_size), round(5 + 5 * share), 0.1 + 0.2 * share


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


class Trainer:
    def __init__(self, config: TrainConfig, train: Sequence[Sample], val: Sequence[Sample],
                 paths: RunPaths, cache_root: Path | None, hooks: Hooks | None = None):
        self.config, self.train_samples, self.val_samples = config, list(train), list(val)
        self.paths, self.cache_root, self.hooks = paths, cache_root, hooks or Hooks()
        self.device = torch.device(config.device)
        self.amp = self.device.type == "cuda"
        self.prep = PreprocessConfig.from_dict({**config.preprocess, "size": config.eval_size})
        self.mean, self.std = model_mean_std(config.model)
        self.model = create_model(config.model, config.pretrained, config.drop_rate)
        if config.freeze_layers:
            freeze_all_but_classifier(self.model)
        # channels_last speeds up convolutions on CPUs (oneDNN) as well as on GPUs.
        self.model.to(self.device, memory_format=torch.channels_last)
        self.optimizer = _optimizer(config, self.model)
        weights = class_weights(self.train_samples) if config.balance == "loss" else None
        self.loss_weights = weights.to(self.device) if weights is not None else None
        self.history: list[dict] = []
        self.start_epoch = 0
        torch.manual_seed(config.seed)

    # -- one pass ---------------------------------------------------------------------------

    def _loader(self, samples: list[Sample], train: bool, size: int, magnitude: int):
        dataset = FundusDataset(samples, self.prep, self.mean, self.std, self.cache_root,
                                size=size, augment=train, magnitude=magnitude)
        return create_loader(dataset, self.config.batch_size, self.config.workers, self.device,
                             shuffle=train, balanced=train and self.config.balance == "sampler",
                             seed=self.config.seed)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return self.model(images).float()

    def train_epoch(self, epoch: int) -> dict:
        size, magnitude, dropout = stage_of(self.config, epoch)
        loader = self._loader(self.train_samples, True, size, magnitude)
        self.model.train()
        if hasattr(self.model, "drop_rate"):
            self.model.drop_rate = dropout
        steps, seen, total_loss, truth, preds = len(loader), 0, 0.0, [], []
        started = time.perf_counter()
        for step, (images, labels, _, failed) in enumerate(loader):
            if failed:
                self.hooks.on_skipped([reason for _, reason in failed])
            if len(labels) == 0:
                continue
            lr = lr_at(self.config, epoch + step / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            labels = labels.to(self.device, non_blocking=True)
            logits = self._forward(images)
            loss = F.cross_entropy(logits, labels, weight=self.loss_weights)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"the loss became {loss.item()} at epoch {epoch + 1}, "
                                    f"batch {step + 1}; lower the learning rate ({lr:.2g})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += len(labels)
            total_loss += loss.item() * len(labels)
            truth.append(labels.cpu())
            preds.append(logits.argmax(1).cpu())
            self.hooks.on_batch(epoch, step + 1, steps, seen / (time.perf_counter() - started))
        y, p = torch.cat(truth).numpy(), torch.cat(preds).numpy()
        report = classification_report(y, p)
        return {"loss": total_loss / max(seen, 1), "lr": lr, "size": size, **report}

    @torch.no_grad()
    def evaluate(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Logits, labels and sample indices of every readable sample."""
        loader = self._loader(samples, False, self.config.eval_size, 0)
        self.model.eval()
        logits, labels, indices = [], [], []
        for images, batch_labels, batch_indices, failed in loader:
            if failed:
                self.hooks.on_skipped([reason for _, reason in failed])
            if len(batch_labels):
                logits.append(self._forward(images).cpu())
                labels.append(batch_labels)
                indices += batch_indices.tolist()
        return torch.cat(logits), torch.cat(labels), indices

    def _validate(self) -> tuple[dict, list[tuple[str, int, int]]]:
        logits, labels, indices = self.evaluate(self.val_samples)
        preds = logits.argmax(1)
        report = classification_report(labels.numpy(), preds.numpy())
        errors = [(self.val_samples[i].path, int(t), int(p))
                  for i, t, p in zip(indices, labels.tolist(), preds.tolist()) if t != p]
        return {"loss": F.cross_entropy(logits, labels).item(), **report}, errors

    # -- the run ----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        self.paths.weights.mkdir(parents=True, exist_ok=True)
        self.paths.report.parent.mkdir(parents=True, exist_ok=True)
        (self.paths.weights / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        self.hooks.on_start(self.config, self.config.epochs)
        writer = SummaryWriter(str(self.paths.tensorboard))
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
                train = self.train_epoch(epoch)
                val, errors = self._validate()
                record = self._record(epoch, train, val, errors)
                self._write_report(epoch, train, val, errors)
                self._write_scalars(writer, record)
                self._save(epoch, record)
                self.hooks.on_epoch(record)
        finally:
            writer.close()
        return self._calibrate()

    def _record(self, epoch: int, train: dict, val: dict,
                errors: list[tuple[str, int, int]]) -> dict:
        record = {
            "epoch": epoch + 1, "lr": train["lr"], "img_size": train["size"],
            "train_loss": train["loss"], "train_acc": train["accuracy"],
            "val_loss": val["loss"], "val_acc": val["accuracy"], "qwk": val["qwk"],
            "precision": val["precision"], "recall": val["recall"],
            "confusion": val["confusion"], "errors": [list(e) for e in errors],
        }
        self.history.append(record)
        return record

    def _write_scalars(self, writer: SummaryWriter, record: dict) -> None:
        step = record["epoch"]
        for tag, key in (("train_loss", "train_loss"), ("train_acc", "train_acc"),
                         ("val_loss", "val_loss"), ("val_acc", "val_acc"),
                         ("learning_rate", "lr"), ("val_qwk", "qwk")):
            writer.add_scalar(tag, record[key], step)
        writer.flush()

    def _write_report(self, epoch: int, train: dict, val: dict,
                      errors: list[tuple[str, int, int]]) -> None:
        """The seed's estimate_info format: precision and recall per class, then every
        misclassified validation image with its true and predicted grade."""
        def numbers(values: list[float]) -> str:
            return ", ".join(f"{v:.4f}" for v in values)

        lines = []
        for split, metrics in (("train", train), ("valid", val)):
            lines += [f"[epoch({split}): {epoch + 1} ]", f"precision: {numbers(metrics['precision'])}",
                      f"recall: {numbers(metrics['recall'])}"]
        lines.append(f"err_name_list [{len(errors)} of {len(self.val_samples)}]:")
        lines += [f"path: {true}/{Path(path).name}    {true}    {pred}" for path, true, pred in errors]
        with open(self.paths.report, "a") as report:
            report.write("\n".join(lines) + "\n\n")

    def _meta(self, epoch: int, record: dict) -> dict:
        return {"model_name": self.config.model, "image_size": self.config.eval_size,
                "train_size": self.config.img_size, "mean": list(self.mean),
                "std": list(self.std), "preprocess": self.prep.to_dict(),
                "train_config": asdict(self.config), "metrics": record, "epoch": epoch + 1,
                "run": self.paths.name, "train_counts": class_counts(self.train_samples)}

    def _save(self, epoch: int, record: dict) -> None:
        meta = self._meta(epoch, record)
        save_checkpoint(self.paths.last, self.model, meta)
        best = max(self.history, key=lambda r: r["qwk"])
        if best is record:
            save_checkpoint(self.paths.best, self.model, meta)
        torch.save({"optimizer": self.optimizer.state_dict(), "epoch": epoch + 1,
                    "history": self.history}, self.paths.state)

    def resume(self) -> None:
        """Continue from the last checkpoint: weights, optimizer state and epoch count."""
        model, _ = load_checkpoint(self.paths.last, self.device)
        self.model.load_state_dict(model.state_dict())
        state = torch.load(self.paths.state, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.history = state["epoch"], state["history"]

    def _calibrate(self) -> TrainResult:
        """Fit a temperature on the validation logits of the best model; store it with it."""
        model, meta = load_checkpoint(self.paths.best, self.device)
        self.model.load_state_dict(model.state_dict())
        logits, labels, _ = self.evaluate(self.val_samples)
        summary = calibration_summary(logits, labels)
        meta.update(temperature=summary["temperature"], calibration=summary)
        save_checkpoint(self.paths.best, self.model, meta)
        best = max(self.history, key=lambda r: r["qwk"])
        return TrainResult(self.paths.best, best["qwk"], self.history, summary)

