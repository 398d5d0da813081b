"""Every labelled image reaches the model: validate the recipe, then train on everything.

A model trained on the training split alone is validated and calibrated on the validation
split as before: that gives the run's curves, its validation figures, the temperature and
the operating point (and, with --select best, the epoch to keep). Then a second model, the
same recipe from the same start and seed, trains on training and validation images
together for the same epochs, and takes the first model's temperature and operating point.
The second one is the run's model: best.pth and last.pth; the first lives in
weights/<run>/validation/.

On a CPU a budget of minutes is the second model's: its epochs are fixed from it, and the
validation phase trains the same epochs on fewer images before it.
"""

import dataclasses
import logging
from pathlib import Path

from engine.data.datasets import Sample
from engine.runtime.distributed import rank
from engine.training.folds import train_folds
from engine.training.trainer import Hooks, RunPaths, TrainConfig, Trainer, TrainResult

log = logging.getLogger(__name__)

VALIDATION = "validation"  # the folder of the validation phase inside the run's own


def train_model(
    config: TrainConfig,
    train: list[Sample],
    val: list[Sample],
    paths: RunPaths,
    cache_root: Path | None,
    hooks: Hooks,
    resume: bool = False,
) -> TrainResult:
    """The run's model: with config.refit, validated on `val` and then trained on `train` and
    `val`; else trained on `train` and validated on `val` (the validated model is the model).
    `resume` continues each phase from its last epoch (a finished validation phase only
    calibrates again). With config.folds > 1 the run is engine.training.folds' instead: on
    `train` and `val` together, or on `train` alone when not refitted, scored then on `val`."""
    if config.folds > 1:
        samples, scored = (train + val, None) if config.refit else (train, val)
        return train_folds(config, samples, paths, cache_root, hooks, resume, scored)
    if not config.refit:
        return fit(Trainer(config, train, val, paths, cache_root, hooks), resume)
    final = Trainer(config, train + val, [], paths, cache_root, hooks)
    if config.minutes and not resume:
        config.epochs = final.epochs_in_budget(config.minutes)
        if rank() == 0:
            log.info(
                "%d epochs on every image fit into %g minutes; the validation phase trains them first",
                config.epochs,
                config.minutes,
            )
    config.minutes = None  # both phases train these epochs
    hooks.on_phase(f"validation phase: {len(train)} training images, {len(val)} validation", 0, 2)
    checked = fit(Trainer(config, train, val, paths.phase(VALIDATION), cache_root, hooks), resume)
    hooks.on_phase(f"final model: every one of the {len(train) + len(val)} images", 1, 2)
    final.calibration = checked.calibration
    if config.select == "best":
        final.keep_epoch = max(checked.epochs, key=lambda r: r["qwk"])["epoch"]
    result = fit(final, resume)
    return dataclasses.replace(checked, best_checkpoint=result.best_checkpoint)


def fit(trainer: Trainer, resume: bool) -> TrainResult:
    if resume and trainer.paths.state.is_file():
        trainer.resume()
    return trainer.fit()


def recorded_paths(paths: RunPaths) -> RunPaths:
    """Where a run recorded the config and samples it started from: its validation phase's
    folder when it was refitted."""
    phase = paths.phase(VALIDATION)
    return phase if phase.config.is_file() else paths
