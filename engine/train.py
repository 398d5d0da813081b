"""Train a grading model, from class folders (the seed's command) or from the curated set.

    python -m engine.train --data-path DIR --epochs 30 --batch-size 8 --weights FILE \
        --freeze-layers false --lr 0.01 --lrf 0.01
    python -m engine.train --from-db            # expert labels + accepted pseudo-labels

Outputs go to the workspace: weights/<run>/{best,last}.pth, runs/<run> (TensorBoard) and
estimate_info/<run>.txt. The last line printed names the best checkpoint and its val QWK.
"""

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from db.queries import curated_set, labelled_images
from db.runs import activate_first
from db.schema import Epoch, Run, utcnow
from db.session import migrate, session_scope
from engine.data import Sample, class_counts, default_workers, folder_samples, stratified_split
from engine.jobs import JobCancelled, JobReporter
from engine.models import default_model, pick_device
from engine.trainer import Hooks, NonFiniteLoss, RunPaths, TrainConfig, Trainer, run_name
from engine.workspace import Workspace

TRUE, FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")


def boolean(text: str) -> bool:
    """'false', 'False' and '0' mean false (the seed's type=bool read them as true)."""
    if text.strip().lower() in TRUE:
        return True
    if text.strip().lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-path", type=Path, help="class folders 0/ 1/ 2/ 3/ (80/20 split)")
    data.add_argument("--from-db", action="store_true", help="the curated set in the workspace")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lrf", type=float, default=0.01)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--weights", default="", help="pretrained weight file (default: the "
                        "model's ImageNet weights found offline)")
    parser.add_argument("--pretrained", type=boolean, default=True)
    parser.add_argument("--freeze-layers", type=boolean, default=False)
    parser.add_argument("--model", help="timm model name (default by device)")
    parser.add_argument("--img-size", type=int, help="training image size (default by model)")
    parser.add_argument("--balance", choices=("loss", "sampler", "none"), default="loss")
    parser.add_argument("--progressive", type=boolean, default=False)
    parser.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best there is)")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", help="run name (default: the date and time)")
    parser.add_argument("--resume", action="store_true", help="continue run --name from last.pth")
    parser.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    args = parser.parse_args(argv)
    if args.resume and not args.name:
        parser.error("--resume needs the --name of the run to continue")
    return args


def make_config(args: argparse.Namespace) -> TrainConfig:
    device = pick_device(args.device)
    model, train_size, eval_size = default_model(device)
    if args.model and args.model != model:
        model, train_size, eval_size = args.model, 224, 224
    if args.img_size:
        train_size = eval_size = args.img_size
    pretrained = args.weights or args.pretrained
    return TrainConfig(
        model=model, img_size=train_size, eval_size=max(eval_size, train_size),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lrf=args.lrf,
        optimizer=args.optimizer, warmup_epochs=args.warmup_epochs, balance=args.balance,
        progressive=args.progressive, freeze_layers=args.freeze_layers, pretrained=pretrained,
        workers=args.workers, seed=args.seed, device=str(device),
    )


def db_samples(db_url: str) -> tuple[list[Sample], list[Sample]]:
    """Training: expert labels, where a reviewer's current decision overrides; validation:
    the validation sources, untouched."""
    train = [Sample(row.path, int(row.grade), row.image, int(row.image_id))
             for row in curated_set(db_url).itertuples()]
    val = [Sample(path, grade, name, i)
           for i, path, name, grade in labelled_images(db_url, "validation")]
    return train, val


class LogHooks(Hooks):
    """Progress to the job row (if any) and to stdout; epochs to the database (if a run)."""

    def __init__(self, job: JobReporter, db_url: str | None = None, run_id: int | None = None):
        self.job, self.db_url, self.run_id = job, db_url, run_id
        self.epochs = 1

    def on_start(self, config: TrainConfig, total_epochs: int) -> None:
        self.epochs = total_epochs

    def on_batch(self, epoch: int, step: int, steps: int, images_per_s: float) -> None:
        self.job.progress((epoch + step / steps) / self.epochs,
                          f"epoch {epoch + 1}/{self.epochs}, batch {step}/{steps}, "
                          f"{images_per_s:.1f} images/s")

    def on_epoch(self, record: dict) -> None:
        print(f"epoch {record['epoch']}: lr {record['lr']:.2e} train loss "
              f"{record['train_loss']:.4f} acc {record['train_acc']:.3f} | val loss "
              f"{record['val_loss']:.4f} acc {record['val_acc']:.3f} QWK {record['qwk']:.4f}",
              flush=True)
        if self.run_id is None:
            return
        with session_scope(self.db_url) as session:
            fields = {k: v for k, v in record.items() if k != "img_size"}
            session.add(Epoch(run_id=self.run_id, **fields))
            run = session.get(Run, self.run_id)
            run.best_qwk = max(run.best_qwk or -1.0, record["qwk"])

    def on_skipped(self, reasons: list[str]) -> None:
        for reason in reasons:
            print(f"skipped {reason}", flush=True)


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
        run = session.get(Run, run_id)
        run.status, run.finished_at = status, utcnow()
        if result is not None:
            run.checkpoint, run.best_qwk = str(result.best_checkpoint), result.best_qwk
            run.temperature, run.calibration = result.calibration["temperature"], result.calibration
            activate_first(session, run)


def train(args: argparse.Namespace, workspace: Workspace, job: JobReporter) -> Path:
    config = make_config(args)
    name = args.name or run_name()
    if args.from_db:
        train_samples, val_samples = db_samples(workspace.db_url)
        if not train_samples or not val_samples:
            raise SystemExit("the workspace needs labelled training images and a validation "
                             "source before a model can be trained")
    else:
        train_samples, val_samples = stratified_split(folder_samples(args.data_path), 0.2, args.seed)
    print(f"{config.model} at {config.img_size}px on {config.device}; train per grade "
          f"{class_counts(train_samples)}, validation {class_counts(val_samples)}", flush=True)
    run_id = _start_run(workspace.db_url, config, name, train_samples) if args.from_db else None
    if run_id is not None:
        job.attach_run(run_id)
    hooks = LogHooks(job, workspace.db_url, run_id)
    trainer = Trainer(config, train_samples, val_samples, RunPaths.under(workspace, name),
                      workspace.cache, hooks)
    if args.resume:
        trainer.resume()
    try:
        result = trainer.fit()
    except BaseException as exc:
        if run_id is not None:
            _finish_run(workspace.db_url, run_id,
                        "cancelled" if isinstance(exc, JobCancelled) else "failed")
        raise
    if run_id is not None:
        _finish_run(workspace.db_url, run_id, "done", result)
    cal = result.calibration
    print(f"temperature {cal['temperature']:.3f}: ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    print(f"best checkpoint: {result.best_checkpoint}  val QWK {result.best_qwk:.4f}")
    return result.best_checkpoint


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pick_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workspace = Workspace.from_env()
    migrate(workspace.db_url)
    torch.set_float32_matmul_precision("high")
    try:
        with JobReporter(workspace.db_url, args.job_id) as job:
            train(args, workspace, job)
    except FileNotFoundError as exc:  # a missing data folder or weight file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
