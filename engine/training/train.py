"""Train a grading model, from class folders (the seed's command) or from the curated set.

    python -m engine.training.train --data-path DIR --epochs 30 --batch-size 8 --weights FILE \
        --freeze-layers false --lr 0.01 --lrf 0.01
    python -m engine.training.train --from-db            # expert labels + accepted pseudo-labels
    torchrun --nproc-per-node N -m engine.training.train --from-db ...    # on N GPUs (DDP)

The defaults are the recipe that learned real photographs best in `python -m bench.realdata`
(see the README); on a CPU they fit the epochs into 20 minutes. Outputs go to the workspace:
weights/<run>/{best,last}.pth with config.json and samples.csv (every image and label the run
learned from or was judged on), runs/<run> (TensorBoard) and estimate_info/<run>.txt. The
last line printed names the kept checkpoint and its val QWK. Under torchrun --batch-size is
the global batch, shared among the processes; rank 0 alone writes the database and files.
"""

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from sqlalchemy import select

from cli import HelpFormatter, setup_logging
from db.queries import curated_set, labelled_images
from db.runs import activate_first
from db.schema import Epoch, Run, utcnow
from db.session import migrate, read_scope, session_scope
from engine.data.datasets import (
    AUGMENTATIONS,
    Sample,
    class_counts,
    default_workers,
    folder_samples,
    read_manifest,
    same_content,
    shared_groups,
    stratified_split,
)
from engine.data.preprocess import PreprocessConfig
from engine.model.networks import (
    WeightsMismatch,
    cpu_bf16_supported,
    default_model,
    model_for_weights,
    model_sizes,
    pick_device,
)
from engine.model.predictor import tta_views
from engine.runtime.distributed import from_rank_0, process_group, rank, world_size
from engine.runtime.jobs import JobCancelled, JobReporter
from engine.runtime.workspace import Workspace

log = logging.getLogger(__name__)
from engine.training.model_card import RunUnusable, write_model_card
from engine.training.refit import recorded_paths, train_model
from engine.training.trainer import Hooks, RunPaths, TrainConfig, TrainingStopped, epoch_line, run_name

# Without --epochs: the seed's 30 epochs on a GPU; on a CPU, what fits into 20 minutes.
GPU_EPOCHS, CPU_MINUTES = 30, 20.0
TRUE, FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")
# A run's name becomes folder and file names under the workspace (weights/<name>/,
# runs/<name>/, estimate_info/<name>.txt): no separator, nor '.' first (so neither '..' nor an
# absolute path), nor '-' first (an option to a command line), and short enough for any file
# system.
RUN_NAME, RUN_NAME_MAX = re.compile(r"\w[\w.-]*"), 100


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run, naming it; None when it can. The one check of every run
    name: engine.training.train --name, the Retrain page's form, engine.loop.import_model."""
    if not RUN_NAME.fullmatch(name) or len(name) > RUN_NAME_MAX:
        return (
            f"run name {name!r}: use letters, digits, '-', '_' and '.' only, starting with a "
            f"letter, digit or '_', at most {RUN_NAME_MAX} characters (it names the run's "
            "folders in the workspace)"
        )
    return None


def run_name_arg(text: str) -> str:
    """--name, checked as argparse reads it: a bad one stops the command before it writes."""
    problem = run_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def views_arg(text: str) -> int:
    """1, 2 or 8 test-time views; true and false, as earlier runs wrote, mean 2 and 1."""
    try:
        return tta_views(int(text) if text.strip().isdigit() else boolean(text))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(f"expected 1, 2 or 8 views, got {text!r}") from exc


def boolean(text: str) -> bool:
    """'false', 'False' and '0' mean false (the seed's type=bool read them as true)."""
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.training.train", description=__doc__, formatter_class=HelpFormatter
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data-path", type=Path, help="class folders 0/ 1/ 2/ 3/ (80/20 split for the validation phase)"
    )
    data.add_argument("--from-db", action="store_true", help="the curated set in the workspace")
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"default: {GPU_EPOCHS} on a GPU; on a CPU as many as fit into {CPU_MINUTES:g} minutes",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--lrf", type=float, default=0.01, help="the cosine schedule ends at lr times this")
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default="adamw",
        help="adamw, or SGD with momentum 0.9 as the seed trained",
    )
    parser.add_argument(
        "--warmup-epochs", type=float, default=1.0, help="linear warm-up (at most a fifth of the epochs)"
    )
    parser.add_argument(
        "--weights",
        default="",
        help="pretrained weight file (default: the model's ImageNet weights found offline)",
    )
    parser.add_argument(
        "--pretrained", type=boolean, default=True, help="start from pretrained weights (false: random ones)"
    )
    parser.add_argument(
        "--freeze-layers",
        type=boolean,
        default=False,
        help="train the classifier alone, as the seed's option did",
    )
    parser.add_argument("--model", help="timm model name (default by device)")
    parser.add_argument("--img-size", type=int, help="training image size (default by model)")
    parser.add_argument(
        "--eval-size",
        type=int,
        help="validation and inference image size "
        "(default: the training size, times the model's eval/train ratio)",
    )
    parser.add_argument(
        "--balance",
        choices=("loss", "sqrt", "sampler", "none"),
        default="sqrt",
        help="loss: inverse-frequency class weights; sqrt: their square root; "
        "sampler: every grade drawn equally often",
    )
    parser.add_argument(
        "--loss",
        choices=("ce", "ordinal"),
        default="ordinal",
        help="ordinal: soft targets on the neighbouring grades",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        help="fit the epochs into this many minutes (measured on a few batches first)",
    )
    parser.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default="light",
        help="light: mirror and quarter turns; strong: also any angle, scale, colour and blur",
    )
    parser.add_argument(
        "--freeze-stages", type=int, default=2, help="keep the stem and this many first stages as pretrained"
    )
    parser.add_argument(
        "--bf16",
        type=boolean,
        default=cpu_bf16_supported(),
        help="bfloat16 autocast on a CPU too (always on a GPU; default: where the CPU computes it natively)",
    )
    parser.add_argument(
        "--refit",
        type=boolean,
        default=True,
        help="after validating and calibrating a model trained on the training "
        "split, train the run's model on training and validation images together "
        "(the same epochs; about twice the time); false: the validated model "
        "is the run's model",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=1,
        help="K > 1: K models, each trained on all folds by person but one and calibrated on "
        "the folds they did not see; the run's model averages their probabilities. Each trains "
        "the epochs a budget of minutes gives one model on every image (about K-1 times the "
        "time); --refit false: on the training split alone, scored on validation",
    )
    parser.add_argument(
        "--select",
        choices=("last", "best"),
        default="last",
        help="the epoch best.pth keeps: the last, or the highest val QWK",
    )
    parser.add_argument(
        "--tta",
        type=views_arg,
        default=8,
        help="test-time views of the kept model: 1, 2 (the mirror image too) "
        "or 8 (mirrors of the four quarter turns); epochs validate on at most 2",
    )
    parser.add_argument(
        "--enhance", type=boolean, default=True, help="Ben Graham's local contrast enhancement"
    )
    parser.add_argument(
        "--progressive",
        type=boolean,
        default=False,
        help="EfficientNetV2's progressive learning: image size and regularisation grow over four stages",
    )
    parser.add_argument("--drop-rate", type=float, default=0.2, help="dropout before the classifier")
    parser.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best there is)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader worker processes")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the sampler, augmentation and the new head"
    )
    parser.add_argument(
        "--name",
        type=run_name_arg,
        help="run name: letters, digits, '-', '_' and '.' (default: the date and time)",
    )
    parser.add_argument("--resume", action="store_true", help="continue run --name from last.pth")
    parser.add_argument(
        "--config",
        type=Path,
        help="a finished run's config.json "
        "(weights/<run>/config.json): a new run with its settings, which the "
        "options given beside it override (default: none)",
    )
    parser.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    args = parser.parse_args(argv)
    if args.config:
        try:
            parser.set_defaults(**run_settings(args.config))
        except (OSError, ValueError, TypeError) as exc:
            parser.error(f"--config {args.config}: {exc}")
        args = parser.parse_args(argv)
    if args.resume and not args.name:
        parser.error("--resume needs the --name of the run to continue")
    return args


# TrainConfig fields that are options of the same name (preprocess and pretrained are not).
REPEATED = (
    "model",
    "img_size",
    "eval_size",
    "epochs",
    "batch_size",
    "lr",
    "lrf",
    "optimizer",
    "warmup_epochs",
    "balance",
    "loss",
    "tta",
    "select",
    "augment",
    "freeze_stages",
    "bf16",
    "progressive",
    "freeze_layers",
    "refit",
    "folds",
    "drop_rate",
    "workers",
    "seed",
    "device",
)


def run_settings(path: Path) -> dict:
    """The option values that repeat the run whose TrainConfig is in `path` (config.json):
    the epochs it trained, not its budget of minutes (--minutes beside it sets one again)."""
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError("not a run's config.json (no model)")
    values = {key: config[key] for key in REPEATED if key in config}
    pretrained = config.get("pretrained", True)
    weights = pretrained if isinstance(pretrained, str) else ""
    return {
        **values,
        "weights": weights,
        "pretrained": bool(pretrained),
        "enhance": config.get("preprocess", {}).get("enhance", True),
    }


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The run's config from the options; a model given by name or by its weight file's name
    gets that model's own sizes, the device's default model the sizes chosen for it."""
    device = pick_device(args.device)
    model, train_size, eval_size = default_model(device)
    named = args.model or (model_for_weights(args.weights) if args.weights else None)
    if named and named != model:
        model, (train_size, eval_size) = named, model_sizes(named)
    # A model evaluated larger than trained (EfficientNetV2: 300 -> 384) keeps the ratio.
    scale = eval_size / train_size
    train_size = args.img_size or train_size
    eval_size = args.eval_size or round(train_size * scale)
    pretrained = args.weights or args.pretrained
    return TrainConfig(
        model=model,
        img_size=train_size,
        eval_size=eval_size,
        epochs=args.epochs or GPU_EPOCHS,
        batch_size=args.batch_size,
        lr=args.lr,
        lrf=args.lrf,
        optimizer=args.optimizer,
        warmup_epochs=args.warmup_epochs,
        balance=args.balance,
        progressive=args.progressive,
        freeze_layers=args.freeze_layers,
        pretrained=pretrained,
        drop_rate=args.drop_rate,
        workers=args.workers,
        seed=args.seed,
        device=str(device),
        loss=args.loss,
        minutes=args.minutes or (CPU_MINUTES if device.type == "cpu" and not args.epochs else None),
        tta=args.tta,
        select=args.select,
        augment=args.augment,
        freeze_stages=args.freeze_stages,
        bf16=args.bf16,
        refit=args.refit,
        folds=args.folds,
        preprocess=PreprocessConfig(size=eval_size, enhance=args.enhance).to_dict(),
    )


def db_samples(db_url: str) -> tuple[list[Sample], list[Sample]]:
    """Training: expert labels and the reviewed pseudo-labels (db.queries.curated_set);
    validation: the validation sources, untouched."""
    train = [
        Sample(row.path, int(row.grade), row.image, int(row.image_id), row.group)
        for row in curated_set(db_url).itertuples()
    ]
    val = [
        Sample(path, grade, name, i, group)
        for i, path, name, grade, group in labelled_images(db_url, "validation")
    ]
    if not train or not val:
        raise SystemExit(
            "the workspace needs labelled training images and a validation "
            "source before a model can be trained"
        )
    return train, val


def folder_split(root: Path, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The seed's 80/20 split of class folders, stratified by grade and kept whole by person."""
    samples = folder_samples(root)
    train, val = stratified_split(samples, 0.2, seed)
    if not train or not val:
        raise SystemExit(
            f"{root}: {len(samples)} images are too few to split 80/20 into "
            "training and validation; add images to the class folders"
        )
    return train, val


def keep_validation_apart(train: list[Sample], val: list[Sample]) -> list[Sample]:
    """The training samples less any person or image (by content) that validation holds, so
    that the yardstick never sees what was learned; says in the log how the split was kept."""
    groups = {s.group for s in train + val if s.group}
    log.info(
        f"people kept apart: {len(groups)} groups known (patient ids or <patient>_left/right names)"
        if groups
        else "no groups known (no patient ids or <patient>_left/right "
        "names): training and validation are split by image"
    )
    shared = shared_groups(train, val)
    copies = same_content(train, val)
    kept = [s for s in train if s.group not in shared and s.path not in copies]
    if len(kept) < len(train):
        log.info(
            "left out of training: %d images of %d people in validation and %d copies of validation images",
            len(train) - len(kept),
            len(shared),
            len(copies),
        )
    return kept


class RankHooks(Hooks):
    """A rank's unreadable images to the log, and its cancel (SIGTERM) to the trainer, which
    stops every rank at the same batch."""

    def __init__(self, job: JobReporter):
        self.job = job

    def on_skipped(self, reasons: list[str]) -> None:
        for reason in reasons:
            log.warning("skipped %s", reason)

    def stop_requested(self) -> bool:
        return self.job.cancelled

    def stop(self) -> None:
        raise JobCancelled()


class JobHooks(RankHooks):
    """Rank 0's: also progress to the job row (if any) or a terminal's bar, phases and epochs to
    the log, epochs to the database (if a run)."""

    def __init__(self, job: JobReporter, db_url: str | None = None, run_id: int | None = None):
        super().__init__(job)
        self.db_url, self.run_id = db_url, run_id
        self.epochs, self.select = 1, "last"
        self.phase, self.phase_index, self.phases = "", 0, 1

    def on_prepare(self, done: int, total: int) -> None:
        self.job.progress(0.0, f"preparing images: {done}/{total}")

    def on_phase(self, name: str, index: int, count: int) -> None:
        self.phase, self.phase_index, self.phases = f"{name.split(':')[0]}, ", index, count
        log.info("%s", name)

    def on_start(self, config: TrainConfig, total_epochs: int) -> None:
        self.epochs, self.select = total_epochs, config.select
        if config.minutes:
            log.info("%d epochs fit into %g minutes", total_epochs, config.minutes)
        # A budget of minutes has just fixed the epochs.
        if self.db_url is not None and self.run_id is not None:
            with session_scope(self.db_url) as session:
                run = session.get_one(Run, self.run_id)
                run.config = {**run.config, "epochs": total_epochs}

    def on_batch(self, epoch: int, step: int, steps: int, images_per_s: float) -> None:
        if self.job.cancelled:
            return  # the trainer stops every rank at the next batch; progress would raise here
        done = (self.phase_index + (epoch + step / steps) / self.epochs) / self.phases
        self.job.progress(
            done,
            f"{self.phase}epoch {epoch + 1}/{self.epochs}, batch {step}/{steps}, {images_per_s:.1f} images/s",
        )

    def on_epoch(self, record: dict) -> None:
        log.info("%s", epoch_line(record))
        # The run's curves are validated epochs.
        if self.db_url is None or self.run_id is None or "qwk" not in record:
            return
        with session_scope(self.db_url) as session:
            fields = {k: v for k, v in record.items() if k != "img_size"}
            session.add(Epoch(run_id=self.run_id, **fields))
            run = session.get_one(Run, self.run_id)
            kept = record["qwk"] if self.select == "last" else max(run.best_qwk or -1.0, record["qwk"])
            run.best_qwk = kept


def _start_run(db_url: str, config: TrainConfig, name: str, train: list[Sample]) -> int:
    with session_scope(db_url) as session:
        run = session.query(Run).filter_by(name=name).one_or_none()
        if run is None:
            run = Run(name=name, model_name=config.model, img_size=config.eval_size)
            session.add(run)
        run.status, run.config = "running", {**asdict(config), "train_counts": class_counts(train)}
        session.flush()
        return run.id


def _finish_run(db_url: str, run_id: int, status: str, result=None) -> None:
    with session_scope(db_url) as session:
        run = session.get_one(Run, run_id)
        run.status, run.finished_at = status, utcnow()
        if result is not None:
            run.checkpoint, run.best_qwk = str(result.best_checkpoint), result.best_qwk
            run.temperature, run.calibration = result.calibration["temperature"], result.calibration
            activate_first(session, run)


def write_card(db_url: str, run_id: int) -> None:
    """MODEL_CARD.md beside the finished run's checkpoint; a card that cannot be written is
    said, and leaves the run done."""
    try:
        log.info("model card: %s", write_model_card(db_url, run_id))
    except (OSError, RunUnusable) as exc:
        log.warning("model card not written: %s", exc)


def run_inputs(
    args: argparse.Namespace, paths: RunPaths, db_url: str
) -> tuple[TrainConfig, list[Sample], list[Sample]]:
    """Config and samples of the run: those it recorded when resumed, else from the options."""
    if args.resume:
        recorded = recorded_paths(paths)
        if not recorded.config.is_file() or not recorded.manifest.is_file():
            raise SystemExit(
                f"run {paths.name} cannot be resumed: {recorded.weights} holds no config.json and samples.csv"
            )
        config = TrainConfig(**json.loads(recorded.config.read_text()))
        config.epochs = args.epochs or config.epochs  # more epochs may be asked for
        return config, *read_manifest(recorded.manifest)
    train, val = db_samples(db_url) if args.from_db else folder_split(args.data_path, args.seed)
    return make_config(args), keep_validation_apart(train, val), val


def run_taken(db_url: str, paths: RunPaths) -> bool:
    """Whether the database records a run of this name, or its weights folder exists."""
    with read_scope(db_url) as session:
        recorded = session.scalar(select(Run.id).where(Run.name == paths.name)) is not None
    return recorded or paths.weights.exists()


def refuse_existing_run(db_url: str, paths: RunPaths) -> None:
    """A new run must not write over the checkpoints and records of an earlier one."""
    if run_taken(db_url, paths):
        raise FileExistsError(
            f"a run named {paths.name} exists already; choose another --name, or add --resume to continue it"
        )


def prepare(
    args: argparse.Namespace, workspace: Workspace
) -> tuple[str, TrainConfig, list[Sample], list[Sample], int | None]:
    """What rank 0 decides for every rank: the run's name, config and samples, and its row in
    the database (with --from-db)."""
    name = args.name or run_name()
    paths = RunPaths.under(workspace, name)
    if not args.resume:
        refuse_existing_run(workspace.db_url, paths)
    config, train_samples, val_samples = run_inputs(args, paths, workspace.db_url)
    processes = (
        f"; {world_size()} processes, {config.batch_size // world_size()} images "
        f"each of a batch of {config.batch_size}"
        if world_size() > 1
        else ""
    )
    log.info(
        f"{config.model} at {config.img_size}px on {config.device}{processes}; train per "
        f"grade {class_counts(train_samples)}, validation {class_counts(val_samples)}"
    )
    run_id = _start_run(workspace.db_url, config, name, train_samples) if args.from_db else None
    return name, config, train_samples, val_samples, run_id


def train(args: argparse.Namespace, workspace: Workspace, job: JobReporter, device: torch.device) -> Path:
    name, config, train_samples, val_samples, run_id = from_rank_0(lambda: prepare(args, workspace))
    config.device = str(device)  # this rank's own GPU under torchrun
    if rank() != 0:
        run_id = None  # the database is rank 0's to write
    if run_id is not None:
        job.attach_run(run_id)
    hooks = JobHooks(job, workspace.db_url, run_id) if rank() == 0 else RankHooks(job)
    try:
        result = train_model(
            config,
            train_samples,
            val_samples,
            RunPaths.under(workspace, name),
            workspace.cache,
            hooks,
            args.resume,
        )
    except BaseException as exc:
        if run_id is not None:
            _finish_run(workspace.db_url, run_id, "cancelled" if isinstance(exc, JobCancelled) else "failed")
        raise
    if run_id is not None:
        _finish_run(workspace.db_url, run_id, "done", result)
        write_card(workspace.db_url, run_id)
    if rank() != 0:
        return result.best_checkpoint
    cal = result.calibration
    print(f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    print(f"best checkpoint: {result.best_checkpoint}  val QWK {result.best_qwk:.4f}")
    return result.best_checkpoint


def say(message: str) -> None:
    """An error in words, once: every rank meets the same one (rank 0 decides them)."""
    if rank() == 0:
        log.error("%s", message)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        say(str(exc))
        return 2
    workspace = Workspace.from_env()
    if rank() == 0:  # the other ranks wait for its plan before anything touches the database
        migrate(workspace.db_url)
    torch.set_float32_matmul_precision("high")
    try:
        # One job row, which rank 0 reports; every rank honours a cancel.
        with (
            JobReporter(workspace.db_url, args.job_id if rank() == 0 else None) as job,
            process_group(device) as device,
        ):
            train(args, workspace, job, device)
    except (FileNotFoundError, FileExistsError) as exc:  # a missing folder, a taken run name
        say(str(exc))
        return 2
    except WeightsMismatch as exc:
        say(f"{exc}; name the model the file was made for with --model")
        return 2
    except TrainingStopped as exc:
        say(f"stopped: {exc}")
        return 1
    except JobCancelled:  # SIGTERM outside a job (a job records it and ends well)
        say("cancelled")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
