"""The training loop: one function for the CLI, the app's jobs and the tests.

It knows neither streamlit nor the database: it takes samples and a config, writes
checkpoints, TensorBoard scalars and the seed's estimate_info report, and tells a `Hooks`
object about every batch and epoch (the job glue turns those into database rows).

Under torchrun every rank runs it (DistributedDataParallel): each takes its share of every
batch (the batch size is the global one), validates its share of the validation set, and
gets the whole epoch's metrics; rank 0 alone writes files.
"""

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from engine.data.datasets import (
    FundusDataset,
    Sample,
    class_counts,
    class_weights,
    create_loader,
    person_halves,
    write_manifest,
    write_probabilities,
)
from engine.data.preprocess import PreprocessCache, PreprocessConfig, fill_cache
from engine.model.calibration import apply_temperature, calibration_summary
from engine.model.metrics import classification_report, validation_screening
from engine.model.networks import (
    create_model,
    freeze_all_but_classifier,
    freeze_stages,
    load_checkpoint,
    model_mean_std,
    save_checkpoint,
)
from engine.model.predictor import tta_logits, tta_views
from engine.runtime.distributed import (
    from_rank_0,
    gather,
    parallel,
    rank,
    same_as_rank_0,
    shard,
    sum_over_ranks,
    world_size,
)
from engine.runtime.workspace import Workspace

log = logging.getLogger(__name__)


def run_name(now: datetime | None = None) -> str:
    """A run's name when none is given: the date and time, as the seed named its logs."""
    return (now or datetime.now()).strftime("%Y%m%d-%H%M%S")


class TrainingStopped(RuntimeError):
    """The run cannot go on; the message says why, in words."""


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite: the run stops instead of training on garbage."""


class NoTrainingImages(TrainingStopped):
    """Not one training image of an epoch could be read."""


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
    balance: str = "loss"  # loss (inverse-frequency weights), sqrt (their square root),
    # sampler (every grade drawn equally often) or none
    loss: str = "ce"  # ce, or ordinal: soft targets that spread onto the neighbouring grades
    minutes: float | None = None  # fit the epochs into this budget, measured before training
    tta: int = 1  # test-time views (predictor.TTA_VIEWS) of the kept model, as inference uses
    select: str = "last"  # the epoch best.pth keeps: last, or best (highest val QWK)
    augment: str = "strong"  # light: mirror and quarter turns; strong: also angle, scale, colour
    freeze_stages: int = 0  # stem and this many first stages stay as pretrained
    bf16: bool = False  # bfloat16 autocast on a CPU too (always on CUDA)
    progressive: bool = False  # EfficientNetV2: size and regularisation grow over 4 stages
    freeze_layers: bool = False
    # Train a second model on every image (validation included) once the first, trained on
    # the training split alone, has been validated and calibrated; the second is the model.
    refit: bool = False
    # Instead: this many models, each trained on all folds by person but one and calibrated
    # together on the folds they did not see; the run's model averages them (engine.training.folds).
    folds: int = 1
    pretrained: str | bool = True  # True: offline ImageNet weights; a path; False: random
    drop_rate: float = 0.2
    workers: int = 1
    seed: int = 0
    device: str = "cpu"
    preprocess: dict[str, Any] = field(default_factory=lambda: PreprocessConfig().to_dict())

    def __post_init__(self) -> None:
        self.tta = tta_views(self.tta)  # a resumed older run may say true or false


VALIDATION_FILE = "validation.csv"


@dataclass
class RunPaths:
    """Where one run writes: checkpoints, TensorBoard scalars, estimate_info report."""

    name: str
    weights: Path
    tensorboard: Path
    report: Path

    @classmethod
    def under(cls, workspace: Workspace, name: str) -> "RunPaths":
        return cls(
            name, workspace.weights / name, workspace.runs / name, workspace.estimate_info / f"{name}.txt"
        )

    @property
    def last(self) -> Path:
        return self.weights / "last.pth"

    @property
    def best(self) -> Path:
        return self.weights / "best.pth"

    @property
    def state(self) -> Path:  # optimizer state and counters, for --resume
        return self.weights / "resume.pt"

    @property
    def config(self) -> Path:
        return self.weights / "config.json"

    @property
    def manifest(self) -> Path:  # every training and validation image with its label
        return self.weights / "samples.csv"

    @property
    def validation(self) -> Path:  # the kept model's calibrated validation probabilities
        return self.weights / VALIDATION_FILE

    def phase(self, name: str) -> "RunPaths":
        """Where a run's validation phase writes, inside the run's own folders."""
        return RunPaths(self.name, self.weights / name, self.tensorboard / name, self.report)


class Hooks:
    """Callbacks from the loop; raising from one stops the run. A stop asked for (a cancel)
    is honoured between batches through `stop_requested` and `stop`, at the same batch on
    every rank."""

    def on_prepare(self, done: int, total: int) -> None: ...
    def on_phase(self, name: str, index: int, count: int) -> None: ...
    def on_start(self, config: TrainConfig, total_epochs: int) -> None: ...
    def on_batch(self, epoch: int, step: int, steps: int, images_per_s: float) -> None: ...
    def on_epoch(self, record: dict) -> None: ...
    def on_skipped(self, reasons: list[str]) -> None: ...

    def stop_requested(self) -> bool:
        return False

    def stop(self) -> None:
        """Raise what ends the run once this or another rank has asked to stop."""
        raise TrainingStopped("stopped on request")


class LogHooks(Hooks):
    """Each phase and epoch as one line in the log, for the commands that train without a job."""

    def on_phase(self, name: str, index: int, count: int) -> None:
        log.info(" %s:", name)

    def on_epoch(self, record: dict) -> None:
        log.info("  %s", epoch_line(record))


def epoch_line(record: dict) -> str:
    """An epoch's record in one line; an epoch without validation has its training half."""
    fold = record.get("fold")
    model = "" if fold is None else "out of fold, " if fold == 0 else f"model {fold}, "
    line = (
        f"{model}epoch {record['epoch']}: lr {record['lr']:.2e} train loss "
        f"{record['train_loss']:.4f} acc {record['train_acc']:.3f}"
    )
    if "qwk" not in record:
        return line
    return f"{line} | val loss {record['val_loss']:.4f} acc {record['val_acc']:.3f} QWK {record['qwk']:.4f}"


@dataclass
class TrainResult:
    best_checkpoint: Path
    best_qwk: float  # on validation (of the validation phase, when the model was refitted)
    epochs: list[dict]  # with validation figures (the validation phase's, when refitted)
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
    if stage == 3:
        size = config.img_size  # the last stage trains at the size the run is named for
    return min(max(size, 32), config.img_size), round(5 + 5 * share), 0.1 + 0.2 * share


# Soft ordinal targets (SORD, Diaz & Marathe 2019): p(k) ~ exp(-ORDINAL_SPREAD * (k - y)^2),
# so that calling a 2 a 1 costs less than calling it a 0; at 2.0 the true grade keeps 0.79-0.88.
ORDINAL_SPREAD = 2.0
BALANCE_POWER = {"loss": 1.0, "sqrt": 0.5}
PROBE_BATCHES = 6  # timed to fit a run into a budget of minutes


def soft_targets(labels: torch.Tensor, classes: int, spread: float = ORDINAL_SPREAD) -> torch.Tensor:
    distance = torch.arange(classes, device=labels.device)[None, :] - labels[:, None]
    return torch.softmax(-spread * distance.float() ** 2, dim=1)


def epochs_for_budget(minutes: float, fixed_s: float, epoch_s: float) -> int:
    """How many epochs of `epoch_s` seconds fit into `minutes` after `fixed_s` seconds of
    one-off work (filling the preprocessing cache); at least one."""
    return max(1, int((minutes * 60 - fixed_s) // max(epoch_s, 1e-9)))


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        train: Sequence[Sample],
        val: Sequence[Sample],
        paths: RunPaths,
        cache_root: Path | None,
        hooks: Hooks | None = None,
    ):
        self.config, self.train_samples, self.val_samples = config, list(train), list(val)
        self.paths, self.cache_root, self.hooks = paths, cache_root, hooks or Hooks()
        self.device = torch.device(config.device)
        self.amp = self.device.type == "cuda" or config.bf16
        self.prep = PreprocessConfig.from_dict({**config.preprocess, "size": config.eval_size})
        self.mean, self.std = model_mean_std(config.model)
        if config.batch_size % world_size():
            raise TrainingStopped(
                f"a batch of {config.batch_size} does not split evenly over "
                f"{world_size()} processes: choose a multiple of {world_size()}"
            )
        self.batch_size = config.batch_size // world_size()  # this rank's share of a batch
        self.main = rank() == 0  # the rank that writes files
        torch.manual_seed(config.seed)  # the new head's initial weights too
        self.model = create_model(config.model, config.pretrained, config.drop_rate)
        if config.freeze_layers:
            freeze_all_but_classifier(self.model)
        freeze_stages(self.model, config.freeze_stages)
        # channels_last speeds up convolutions on CPUs (oneDNN) as well as on GPUs.
        self.model.to(self.device).to(memory_format=torch.channels_last)
        self.net = self.model  # what trains: under torchrun, `parallel` wraps it in fit()
        self.optimizer = _optimizer(config, self.model)
        power = BALANCE_POWER.get(config.balance)
        self.loss_weights = (
            class_weights(self.train_samples, power).to(self.device) if power is not None else None
        )
        self.history: list[dict] = []
        self.start_epoch = 0
        # engine.training.folds: model `fold` of a run, calibrated with the others' held-out logits
        self.calibrates = True
        self.fold: int | None = None
        # Without validation samples: the epoch best.pth keeps (default the last), and the
        # calibration that another model's validation made for it.
        self.keep_epoch: int | None = None
        self.calibration: dict | None = None

    # -- one pass ---------------------------------------------------------------------------

    def _loader(
        self,
        samples: list[Sample],
        train: bool,
        size: int,
        magnitude: int,
        epoch: int = 0,
        shared: bool = False,
    ):
        """`shared`: this rank's share of the epoch's draws (the others take the rest)."""
        dataset = FundusDataset(
            samples,
            self.prep,
            self.mean,
            self.std,
            self.cache_root,
            size=size,
            augment=self.config.augment if train else None,
            magnitude=magnitude,
        )
        # A new order (and new sampler draws) every epoch, the same for a seed.
        return create_loader(
            dataset,
            self.batch_size,
            self.config.workers,
            self.device,
            shuffle=train,
            balanced=train and self.config.balance == "sampler",
            seed=self.config.seed * 100_003 + epoch,
            share=(rank(), world_size()) if shared else (0, 1),
        )

    def _forward(self, images: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return (model or self.model)(images).float()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The loss to differentiate, and the objective's value on the whole batch (all ranks).

        One process's objective is F.cross_entropy's mean: the class-weighted mean over the
        batch for hard targets, the plain mean for soft ones. Each rank sums its share and
        divides by the whole batch's denominator, times the ranks that DDP averages over, so
        that the gradient is exactly the one-process gradient of the same batch."""
        ordinal = self.config.loss == "ordinal"
        targets = soft_targets(labels, logits.shape[1]) if ordinal else labels
        losses = F.cross_entropy(logits, targets, weight=self.loss_weights, reduction="none")
        weights = torch.ones_like(losses)
        if self.loss_weights is not None and not ordinal:
            weights = self.loss_weights[labels]
        denominator, total = sum_over_ranks(
            torch.stack([weights.sum(), losses.detach().sum()]).tolist(), self.device
        )
        return losses.sum() * (world_size() / denominator), total / denominator

    def _take_step(self, labels: torch.Tensor) -> bool:
        """Whether every rank takes this step: none does if a rank has no readable image in
        its share of the batch (it could not join the gradient exchange); a stop asked for on
        any rank stops every rank here."""
        ready, stops = sum_over_ranks([int(len(labels) > 0), int(self.hooks.stop_requested())], self.device)
        if stops:
            self.hooks.stop()
        return ready == world_size()

    def train_epoch(self, epoch: int) -> dict:
        size, magnitude, dropout = stage_of(self.config, epoch)
        loader = self._loader(self.train_samples, True, size, magnitude, epoch, shared=True)
        self.net.train()
        if hasattr(self.model, "drop_rate"):
            # timm's float attribute; torch types every module attribute as Tensor | Module.
            self.model.drop_rate = dropout  # type: ignore[assignment]
        steps, seen, total_loss = len(loader), 0, 0.0
        truth: list[torch.Tensor] = []
        preds: list[torch.Tensor] = []
        started = time.perf_counter()
        for step, (images, labels, _, failed) in enumerate(loader):
            if failed:
                self.hooks.on_skipped([reason for _, reason in failed])
            if not self._take_step(labels):
                continue
            lr = lr_at(self.config, epoch + step / steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            labels = labels.to(self.device, non_blocking=True)
            logits = self._forward(images, self.net)
            loss, value = self._loss(logits, labels)
            if not math.isfinite(value):
                raise NonFiniteLoss(
                    f"the loss became {value} at epoch {epoch + 1}, "
                    f"batch {step + 1}; lower the learning rate ({lr:.2g})"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += len(labels)
            # Plain cross-entropy, whatever the objective, so that it compares with val loss.
            total_loss += F.cross_entropy(logits.detach(), labels, reduction="sum").item()
            truth.append(labels.cpu())
            preds.append(logits.argmax(1).cpu())
            self.hooks.on_batch(epoch, step + 1, steps, seen * world_size() / (time.perf_counter() - started))
        ranks = gather((seen, total_loss, truth, preds))  # the epoch over every rank's images
        seen, total_loss = sum(r[0] for r in ranks), sum(r[1] for r in ranks)
        if seen == 0:
            raise NoTrainingImages(
                f"epoch {epoch + 1}: none of the {len(self.train_samples)} "
                "training images could be read (the log names each)"
            )
        y = torch.cat([t for r in ranks for t in r[2]]).numpy()
        p = torch.cat([t for r in ranks for t in r[3]]).numpy()
        report = classification_report(y, p)
        return {"loss": total_loss / seen, "lr": lr, "size": size, **report}

    @torch.no_grad()
    def evaluate(self, samples: list[Sample], views: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Logits (over `views` test-time views), labels and sample indices of every readable
        sample, in the samples' order.
        Each rank evaluates its share with rank 0's model (what rank 0 saves), and every rank
        gets the whole: N ranks validate N times faster, and none waits idle at a barrier
        long enough for it to time out."""
        same_as_rank_0(self.model)
        share = shard(samples)
        loader = self._loader([sample for _, sample in share], False, self.config.eval_size, 0)
        self.model.eval()
        logits, labels, indices, stop = [], [], [], False
        for images, batch_labels, batch_indices, failed in loader:
            stop = self.hooks.stop_requested()
            if stop:
                break
            if failed:
                self.hooks.on_skipped([reason for _, reason in failed])
            if len(batch_labels):
                logits.append(tta_logits(self._forward, images, views).cpu())
                labels.append(batch_labels)
                indices += [share[i][0] for i in batch_indices.tolist()]
        ranks = gather((stop, logits, labels, indices))
        if any(r[0] for r in ranks):
            self.hooks.stop()
        indices = [i for r in ranks for i in r[3]]
        order = np.argsort(indices, kind="stable")
        return (
            torch.cat([t for r in ranks for t in r[1]])[order],
            torch.cat([t for r in ranks for t in r[2]])[order],
            [indices[i] for i in order],
        )

    def _validate(self) -> tuple[dict, list[tuple[str, int, int]]]:
        logits, labels, indices = self.evaluate(self.val_samples, self._monitor_views)
        preds = logits.argmax(1)
        report = classification_report(labels.numpy(), preds.numpy())
        errors = [
            (self.val_samples[i].path, int(t), int(p))
            for i, t, p in zip(indices, labels.tolist(), preds.tolist(), strict=True)
            if t != p
        ]
        return {"loss": F.cross_entropy(logits, labels).item(), **report}, errors

    # -- the run ----------------------------------------------------------------------------

    def epochs_in_budget(self, minutes: float) -> int:
        """The epochs that fit into `minutes`, counting the time already spent preparing the
        images (each rank prepares its share). Rank 0 times the epoch; every rank gets its
        count, so that all train alike."""
        started = time.perf_counter()
        if self.cache_root:
            mine = [Path(s.path) for _, s in shard(self.train_samples + self.val_samples)]
            fill_cache(mine, self.prep, PreprocessCache(self.cache_root), self.hooks.on_prepare)

        def epochs() -> int:
            train_s, view_s = self.seconds_per_image()
            epoch_s = len(self.train_samples) * train_s + len(self.val_samples) * view_s * self._monitor_views
            calibration_s = len(self.val_samples) * view_s * self.config.tta
            return epochs_for_budget(
                minutes, time.perf_counter() - started + calibration_s / world_size(), epoch_s / world_size()
            )

        return from_rank_0(epochs)

    @property
    def _monitor_views(self) -> int:
        """Each epoch validates on at most the image and its mirror: 8 views would cost about
        a minute an epoch on a CPU (the budgeted 20 minutes would lose two epochs), and the
        kept model's calibration sees all of the views anyway."""
        return min(self.config.tta, 2)

    def seconds_per_image(self) -> tuple[float, float]:
        """(training step, one validation view) per image on each rank: a few training steps,
        and a validation batch, are timed on a copy of the model."""
        size, magnitude, _ = stage_of(self.config, self.config.epochs - 1)
        probe = self.train_samples[: self.batch_size * PROBE_BATCHES]
        model = copy.deepcopy(self.model).train()
        optimizer = _optimizer(self.config, model)
        timed, clock = 0, time.perf_counter()
        for n, (images, labels, _, _) in enumerate(self._loader(probe, True, size, magnitude)):
            if n == 1:  # the first step sets up kernels and caches
                timed, clock = 0, time.perf_counter()
            loss = F.cross_entropy(self._forward(images, model), labels.to(self.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            timed += len(labels)
        train_s = (time.perf_counter() - clock) / max(timed, 1)
        clock = time.perf_counter()
        with torch.no_grad():
            batch = next(iter(self._loader(probe, False, self.config.eval_size, 0)))[0]
            self._forward(batch, model.eval())
        return train_s, (time.perf_counter() - clock) / len(batch)

    def _open_outputs(self) -> SummaryWriter:
        self.paths.weights.mkdir(parents=True, exist_ok=True)
        self.paths.report.parent.mkdir(parents=True, exist_ok=True)
        self.paths.config.write_text(json.dumps(asdict(self.config), indent=2))
        write_manifest(self.paths.manifest, self.train_samples, self.val_samples)
        return SummaryWriter(str(self.paths.tensorboard))

    def fit(self) -> TrainResult:
        """Train the config's epochs (fixed from its minutes first, if it has them); with
        validation samples, calibrate the kept model on them."""
        if self.config.minutes and self.start_epoch == 0:
            self.config.epochs = self.epochs_in_budget(self.config.minutes)
        # Augmentation and dropout draw from here: each rank its own numbers.
        torch.manual_seed(self.config.seed * 65_537 + rank() + self.start_epoch)
        self.net = parallel(self.model, self.device)
        writer = self._open_outputs() if self.main else None
        self.hooks.on_start(self.config, self.config.epochs)
        try:
            for epoch in range(self.start_epoch, self.config.epochs):
                train = self.train_epoch(epoch)
                val, errors = self._validate() if self.val_samples else (None, [])
                record = self._record(epoch, train, val, errors)
                if writer is not None:
                    if val is not None:
                        self._write_report(epoch, train, val, errors)
                    self._write_scalars(writer, record)
                    self._save(epoch, record)
                self.hooks.on_epoch(record)
        finally:
            if writer is not None:
                writer.close()
        if not self.val_samples or not self.calibrates:
            return TrainResult(self.paths.best, float("nan"), self.history, self.calibration or {})
        return self._calibrate()

    def _record(self, epoch: int, train: dict, val: dict | None, errors: list[tuple[str, int, int]]) -> dict:
        record = {
            "epoch": epoch + 1,
            "lr": train["lr"],
            "img_size": train["size"],
            "train_loss": train["loss"],
            "train_acc": train["accuracy"],
        }
        if val is not None:
            record.update(
                val_loss=val["loss"],
                val_acc=val["accuracy"],
                qwk=val["qwk"],
                precision=val["precision"],
                recall=val["recall"],
                confusion=val["confusion"],
                errors=[list(e) for e in errors],
            )
        if self.fold:
            record["fold"] = self.fold
        self.history.append(record)
        return record

    def _write_scalars(self, writer: SummaryWriter, record: dict) -> None:
        step = record["epoch"]
        for tag, key in (
            ("train_loss", "train_loss"),
            ("train_acc", "train_acc"),
            ("val_loss", "val_loss"),
            ("val_acc", "val_acc"),
            ("learning_rate", "lr"),
            ("val_qwk", "qwk"),
        ):
            if key in record:
                writer.add_scalar(tag, record[key], step)
        writer.flush()

    def _write_report(self, epoch: int, train: dict, val: dict, errors: list[tuple[str, int, int]]) -> None:
        """The seed's estimate_info format: precision and recall per class, then every
        misclassified validation image with its true and predicted grade."""

        def numbers(values: list[float]) -> str:
            return ", ".join(f"{v:.4f}" for v in values)

        lines = []
        for split, metrics in (("train", train), ("valid", val)):
            lines += [
                f"[epoch({split}): {epoch + 1} ]",
                f"precision: {numbers(metrics['precision'])}",
                f"recall: {numbers(metrics['recall'])}",
            ]
        lines.append(f"err_name_list [{len(errors)} of {len(self.val_samples)}]:")
        lines += [f"path: {true}/{Path(path).name}    {true}    {pred}" for path, true, pred in errors]
        with open(self.paths.report, "a") as report:
            report.write("\n".join(lines) + "\n\n")

    def _meta(self, epoch: int, record: dict) -> dict:
        return {
            "model_name": self.config.model,
            "image_size": self.config.eval_size,
            "train_size": self.config.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "preprocess": self.prep.to_dict(),
            "train_config": asdict(self.config),
            "metrics": record,
            "epoch": epoch + 1,
            "run": self.paths.name,
            "train_counts": class_counts(self.train_samples),
            **(
                {"temperature": self.calibration["temperature"], "calibration": self.calibration}
                if self.calibration
                else {}
            ),
        }

    def _selected(self) -> dict:
        """The epoch record that best.pth holds. "last" leaves the validation set unused by the
        choice, so the temperature fitted on it afterwards is fitted on unseen data. Without
        validation, `keep_epoch` (chosen by another run's validation) or the last."""
        if not self.val_samples:
            return self.history[min(self.keep_epoch or len(self.history), len(self.history)) - 1]
        if self.config.select == "last":
            return self.history[-1]
        return max(self.history, key=lambda r: r["qwk"])

    def _save(self, epoch: int, record: dict) -> None:
        meta = self._meta(epoch, record)
        save_checkpoint(self.paths.last, self.model, meta)
        if self._selected() is record:
            save_checkpoint(self.paths.best, self.model, meta)
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "epoch": epoch + 1, "history": self.history},
            self.paths.state,
        )

    def _load(self, checkpoint: Path) -> dict:
        """The checkpoint's weights into the model; its meta."""
        model, meta = load_checkpoint(checkpoint)
        self.model.load_state_dict(model.state_dict())
        return meta

    def resume(self) -> None:
        """Continue from the last checkpoint: weights, optimizer state and epoch count. Rank 0
        reads them (only its machine need hold the run's files) and hands them on."""

        def read() -> dict:
            self._load(self.paths.last)
            return torch.load(self.paths.state, map_location="cpu", weights_only=True)

        state = from_rank_0(read)
        same_as_rank_0(self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.history = state["epoch"], state["history"]

    def held_out_logits(self) -> tuple[torch.Tensor, torch.Tensor, list[Sample], dict]:
        """The kept model (best.pth, loaded into this trainer) on the validation samples at its
        test-time views, in the precision inference computes in (float32 on a CPU): logits,
        labels and the samples read, and best.pth's meta."""
        meta = from_rank_0(lambda: self._load(self.paths.best))  # evaluate shares the weights
        self.amp = self.device.type == "cuda"
        logits, labels, indices = self.evaluate(self.val_samples, self.config.tta)
        return logits, labels, [self.val_samples[i] for i in indices], meta

    def _calibrate(self) -> TrainResult:
        """Fit a temperature on the validation logits of the best model, and choose the
        operating point on its calibrated probabilities; store both with it, and the
        probabilities beside it."""
        logits, labels, samples, meta = self.held_out_logits()
        summary, probs = calibrate(logits, labels, samples, self.config.seed)
        meta.update(temperature=summary["temperature"], calibration=summary)
        if self.main:
            save_checkpoint(self.paths.best, self.model, meta)
            write_probabilities(self.paths.validation, samples, probs)
        return TrainResult(self.paths.best, self._selected()["qwk"], self.history, summary)


def calibrate(
    logits: torch.Tensor, labels: torch.Tensor, samples: list[Sample], seed: int
) -> tuple[dict, np.ndarray]:
    """The temperature fitted on held-out logits and the operating point chosen on the
    calibrated probabilities, with their figures (cross-fitted over two halves by person);
    and those probabilities."""
    folds = person_halves(samples, seed)
    summary = calibration_summary(logits, labels, folds)
    probs = apply_temperature(logits, summary["temperature"]).numpy()
    summary["screening"] = {
        **validation_screening(probs, labels.numpy(), [s.group for s in samples], folds),
        "seed": seed,
    }
    return summary, probs
