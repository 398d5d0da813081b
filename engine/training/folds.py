"""Every labelled image reaches the model and every one validates it: K models, K folds by person.

The labelled images are dealt into K folds by person, each grade spread evenly. Model i trains
on the other K-1 folds and predicts fold i, which it never saw; together these out-of-fold
predictions cover every image once, and give the run's temperature, operating point and
validation figures. The run's model averages the K models' probabilities (an Ensemble), which
is steadier than one model (README, "How much the same training differs from itself"), and
it is the model whose members made the predictions that calibrated it, where a refit takes
the temperature and operating point of another model.

Model i is the run's recipe with seed + i. A budget of minutes fixes the epochs as for a refit
(engine.training.refit): those that one model on every image trains in it; each of the K
models trains them on (K-1)/K of the images, so a run takes about K-1 times the budget (a
refit about 1.8 times). Model i lives in weights/<run>/fold-<i>/; best.pth and last.pth are
the Ensemble.
"""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from engine.data.datasets import Sample, class_counts, person_folds, write_manifest, write_probabilities
from engine.model.metrics import classification_report
from engine.model.networks import Ensemble, save_checkpoint
from engine.model.predictor import default_batch_size, predict
from engine.runtime.distributed import rank
from engine.training.trainer import Hooks, RunPaths, TrainConfig, Trainer, TrainResult, calibrate

log = logging.getLogger(__name__)


def train_folds(
    config: TrainConfig,
    samples: list[Sample],
    paths: RunPaths,
    cache_root: Path | None,
    hooks: Hooks,
    resume: bool = False,
    scored: list[Sample] | None = None,
) -> TrainResult:
    """The Ensemble of config.folds models trained on `samples` by folds, calibrated on their
    out-of-fold logits. Its validation probabilities (validation.csv) are those out-of-fold
    ones, or with `scored` (images no model learned from) the Ensemble's on them."""
    k = config.folds
    fold_of = person_folds(samples, k, config.seed)
    parts = [
        (
            [s for s, f in zip(samples, fold_of, strict=True) if f != i],
            [s for s, f in zip(samples, fold_of, strict=True) if f == i],
        )
        for i in range(k)
    ]
    if config.minutes and not resume:
        config.epochs = Trainer(config, samples, [], paths, cache_root, hooks).epochs_in_budget(
            config.minutes
        )
        if rank() == 0:
            log.info(
                "%d epochs on every image fit into %g minutes; each of the %d models trains them",
                config.epochs,
                config.minutes,
                k,
            )
    config.minutes = None
    if rank() == 0:  # what the run learned from, and how: for --resume and the model card
        paths.weights.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(json.dumps(dataclasses.asdict(config), indent=2))
        write_manifest(paths.manifest, samples, scored or [])
    members, logits, labels, read, history = [], [], [], [], []
    for i, (train, held) in enumerate(parts):
        hooks.on_phase(f"model {i + 1} of {k}: {len(train)} training images, {len(held)} held out", i, k)
        fold = dataclasses.replace(config, seed=config.seed + i)
        trainer = Trainer(fold, train, held, paths.phase(f"fold-{i + 1}"), cache_root, hooks)
        trainer.calibrates, trainer.fold = False, i + 1
        if resume and trainer.paths.state.is_file():
            trainer.resume()
        history += trainer.fit().epochs
        fold_logits, fold_labels, fold_read, meta = trainer.held_out_logits()
        logits.append(fold_logits)
        labels.append(fold_labels)
        read += fold_read
        members.append(trainer.model.cpu())
    summary, probs = calibrate(torch.cat(logits), torch.cat(labels), read, config.seed)
    record = out_of_fold_record(history, probs, torch.cat(labels).numpy(), read)
    hooks.on_epoch(record)
    meta.update(
        members=k,
        temperature=summary["temperature"],
        calibration=summary,
        train_config=dataclasses.asdict(config),
        train_counts=class_counts(samples),
        metrics=record,
    )
    ensemble = Ensemble(members).eval()
    if rank() == 0:
        for path in (paths.best, paths.last):
            save_checkpoint(path, ensemble, meta)
        if scored:
            device = torch.device(config.device)
            scores = predict(
                ensemble,
                meta,
                scored,
                device,
                default_batch_size(device),
                tta=config.tta,
                cache_root=cache_root,
            )
            read, probs = [scored[i] for i in scores.indices], scores.probs
        write_probabilities(paths.validation, read, probs)
    return TrainResult(paths.best, record["qwk"], history, summary)


def out_of_fold_record(
    history: list[dict], probs: np.ndarray, labels: np.ndarray, read: list[Sample]
) -> dict:
    """The run's own epoch record (fold 0) at the models' last epoch: their training figures
    averaged, and the validation figures of every image graded by the model that did not
    learn it (calibrated)."""
    last = [r for r in history if r["epoch"] == history[-1]["epoch"]]
    graded = probs.argmax(1)
    report = classification_report(labels, graded)
    return {
        "epoch": history[-1]["epoch"],
        "lr": history[-1]["lr"],
        "img_size": history[-1]["img_size"],
        "train_loss": float(np.mean([r["train_loss"] for r in last])),
        "train_acc": float(np.mean([r["train_acc"] for r in last])),
        "val_loss": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean()),
        "val_acc": report["accuracy"],
        "qwk": report["qwk"],
        "precision": report["precision"],
        "recall": report["recall"],
        "confusion": report["confusion"],
        "errors": [[s.path, int(t), int(g)] for s, t, g in zip(read, labels, graded, strict=True) if t != g],
        "fold": 0,
    }
