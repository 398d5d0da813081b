"""Predict grades for a pool of images and store the probabilities under the model's version.

    python -m engine.model.infer --checkpoint FILE (--source NAME | --images DIR) [--out submission.csv] [--tta 1|2|8] [--redo]
                           [--cpu-runtime onnxruntime|pytorch]
    torchrun --nproc-per-node N -m engine.model.infer ...     (the pool shared among N processes)

Predictions are stored batch by batch, and images that the model has predicted already are
skipped unless --redo is given: a run after a crash or a cancel predicts only the rest. Then
the Kaggle-style submission CSV (id_code, diagnosis; the diagnosis on the model's 0-3 scale)
of the whole pool is written from the database. Unreadable images are reported and skipped;
the rest finish. On a CPU, onnxruntime runs the network (engine.model.onnx_network).
"""

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from sqlalchemy import select

from cli import HelpFormatter, setup_logging
from db.predictions import predicted_count, submission_frame
from db.queries import unused_name
from db.runs import activate_first
from db.schema import Image, Prediction, Run, Source, utcnow
from db.session import migrate, read_scope, session_scope, upsert_insert
from engine.data.datasets import Sample, default_workers
from engine.data.sources import ImportStopped, import_source
from engine.model.networks import load_checkpoint, pick_device
from engine.model.onnx_network import CPU_RUNTIMES, onnx_network
from engine.model.predictor import (
    TTA_VIEWS,
    Network,
    Predictions,
    default_batch_size,
    model_views,
    predict_batches,
)
from engine.runtime.distributed import from_rank_0, process_group, rank, shard, sum_over_ranks
from engine.runtime.jobs import JobReporter
from engine.runtime.workspace import Workspace

log = logging.getLogger(__name__)


def register_model(db_url: str, checkpoint: Path, meta: dict) -> int:
    """The run row of a checkpoint; a checkpoint trained elsewhere gets one on first use."""
    with session_scope(db_url) as session:
        run = session.scalar(select(Run).where(Run.checkpoint == str(checkpoint)))
        if run is None:
            name = unused_name(session, Run.name, meta.get("run") or checkpoint.stem)
            run = Run(
                name=name,
                model_name=meta["model_name"],
                img_size=meta["image_size"],
                config=meta.get("train_config", {}),
                status="done",
                checkpoint=str(checkpoint),
                temperature=meta.get("temperature", 1.0),
                calibration=meta.get("calibration", {}),
                best_qwk=meta.get("metrics", {}).get("qwk"),
                finished_at=utcnow(),
            )
            session.add(run)
            session.flush()
            activate_first(session, run)
        return run.id


def source_samples(db_url: str, name: str, unpredicted_by: int | None = None) -> tuple[int, list[Sample]]:
    """The source's id and its images in import order; with `unpredicted_by`, only those
    that this run has not predicted yet."""
    with read_scope(db_url) as session:
        source = session.scalar(select(Source).where(Source.name == name))
        if source is None:
            names = ", ".join(session.scalars(select(Source.name))) or "none yet"
            raise LookupError(f"no source named {name!r} (sources: {names})")
        query = select(Image.id, Image.path, Image.name).where(Image.source_id == source.id)
        if unpredicted_by is not None:
            query = query.where(
                ~select(Prediction.id)
                .where(Prediction.run_id == unpredicted_by, Prediction.image_id == Image.id)
                .exists()
            )
        rows = session.execute(query.order_by(Image.id)).all()
        return source.id, [
            Sample(f"{source.root}/{path}", None, image_name, i) for i, path, image_name in rows
        ]


def store_predictions(db_url: str, run_id: int, samples: list[Sample], result: Predictions) -> None:
    """Upsert one row per (model, image): running the same model again replaces its rows."""
    rows = [
        {
            "run_id": run_id,
            "image_id": samples[i].image_id,
            "p0": float(p[0]),
            "p1": float(p[1]),
            "p2": float(p[2]),
            "p3": float(p[3]),
            "grade": int(p.argmax()),
            "confidence": float(p.max()),
            "created_at": utcnow(),
        }
        for i, p in zip(result.indices, result.probs, strict=True)
    ]
    with session_scope(db_url) as session:
        insert = upsert_insert(session)
        for start in range(0, len(rows), 500):
            statement = insert(Prediction).values(rows[start : start + 500])
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["run_id", "image_id"],
                    set_={
                        c: statement.excluded[c]
                        for c in ("p0", "p1", "p2", "p3", "grade", "confidence", "created_at")
                    },
                )
            )


@dataclass
class Plan:
    """What every rank works from, decided once by rank 0."""

    run_id: int
    source_id: int
    source: str
    todo: list[Sample]  # the pool's images left to predict
    done_before: int  # the pool's images that the model had predicted already (0 with --redo)
    started: datetime  # the predictions stored since then are this run's

    @property
    def total(self) -> int:
        return self.done_before + len(self.todo)


def plan_pool(args: argparse.Namespace, db_url: str, meta: dict) -> Plan:
    """The model's run row, the pool (imported first if a folder) and what is left of it."""
    started = utcnow()
    run_id = register_model(db_url, args.checkpoint.resolve(), meta)
    source = args.source
    if args.images is not None:
        report = import_source(db_url, "unlabelled", args.images, "unlabelled")
        log.info("%s", report)
        source = report.source
    source_id, todo = source_samples(db_url, source, None if args.redo else run_id)
    done_before = 0 if args.redo else predicted_count(db_url, run_id, source_id)
    return Plan(run_id, source_id, source, todo, done_before, started)


def progress_reporter(job: JobReporter, db_url: str, plan: Plan) -> Callable[..., None]:
    """A check for a cancel that, in the process that reports the job, records the progress
    of every rank, counted from the predictions they have stored; `force` for the last."""
    clock = time.perf_counter()

    def report(force: bool = False) -> None:
        job.check_cancel()
        if not (force or job.due()):
            return
        made = predicted_count(db_url, plan.run_id, plan.source_id, plan.started)
        done, rate = plan.done_before + made, made / (time.perf_counter() - clock)
        left = (plan.total - done) / rate if rate else 0
        job.progress(
            done / max(plan.total, 1),
            f"{done}/{plan.total} images, {rate:.1f} images/s, {left:.0f} s left",
            force=force,
        )

    return report


def predict_share(
    args: argparse.Namespace,
    workspace: Workspace,
    device: torch.device,
    model: Network,
    meta: dict,
    plan: Plan,
    report: Callable[[], None],
) -> tuple[int, int]:
    """This rank's share of the images left, stored batch by batch as they are predicted,
    so that a crash or a cancel keeps what is done; (predicted, skipped)."""
    share = [image for _, image in shard(plan.todo)]
    batch_size = args.batch_size or default_batch_size(device)
    predicted = skipped = 0
    for batch in predict_batches(
        model, meta, share, device, batch_size, args.workers, args.tta or model_views(meta), workspace.cache
    ):
        store_predictions(workspace.db_url, plan.run_id, share, batch)
        for index, reason in batch.failures:
            log.warning("skipped %s: %s", share[index].name, reason)
        predicted, skipped = predicted + len(batch.indices), skipped + len(batch.failures)
        report()
    return predicted, skipped


def submission_path(workspace: Workspace, run: str, source: str) -> Path:
    """Where the app keeps the submission of `run` for `source`: a file right in the
    workspace's submissions folder, whatever the names hold (a source's name is free text,
    and a run registered from a checkpoint keeps the name its file gave)."""
    return workspace.root / "submissions" / (re.sub(r"[^\w.-]", "_", f"{run}-{source}") + ".csv")


def write_submission(path: Path, db_url: str, plan: Plan) -> None:
    """The whole pool's submission, from the database: this run's predictions and those that
    an earlier run of the model made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    submission_frame(db_url, plan.run_id, plan.source_id).to_csv(path, index=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.model.infer", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's best.pth (or last.pth)")
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--source", help="an imported source, by name")
    pool.add_argument("--images", type=Path, help="a folder of images (imported as a pool)")
    parser.add_argument(
        "--out", type=Path, help="submission CSV (default: submissions/<run>-<source>.csv in the workspace)"
    )
    parser.add_argument(
        "--tta",
        type=int,
        choices=tuple(TTA_VIEWS),
        nargs="?",
        const=2,
        help="test-time views to average: 1, 2 (the mirror image too; a bare "
        "--tta) or 8 (the mirrors of the four quarter turns); default: those the "
        "model was calibrated with",
    )
    parser.add_argument(
        "--redo", action="store_true", help="predict again the images that the model has predicted already"
    )
    parser.add_argument("--batch-size", type=int, help="default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader worker processes")
    parser.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best there is)")
    parser.add_argument(
        "--cpu-runtime",
        choices=CPU_RUNTIMES,
        default=os.environ.get("DR_CPU_RUNTIME", CPU_RUNTIMES[0]),
        help="what runs the network on a CPU: onnxruntime (several times as "
        "fast, the same grades: bench.inference) or pytorch; a GPU always runs "
        "PyTorch (default: $DR_CPU_RUNTIME, else onnxruntime)",
    )
    parser.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    args = parser.parse_args(argv)
    if args.cpu_runtime not in CPU_RUNTIMES:  # a default from the environment
        parser.error(f"DR_CPU_RUNTIME is one of {', '.join(CPU_RUNTIMES)}, not {args.cpu_runtime!r}")
    return args


def network_for(
    args: argparse.Namespace, workspace: Workspace, model: torch.nn.Module, meta: dict, device: torch.device
) -> Network:
    """The network that grades the images: on a CPU, the model on onnxruntime unless told
    otherwise; PyTorch's model where its export fails or disagrees, which the log says."""
    if device.type != "cpu" or args.cpu_runtime == "pytorch":
        return model
    started = time.perf_counter()
    try:
        network = onnx_network(model, meta, args.checkpoint, workspace.cache)
    except Exception as exc:  # an export that fails costs speed, never the job
        log.warning(
            "onnxruntime not used, PyTorch grades the images: the export failed (%s: %s)",
            type(exc).__name__,
            exc,
        )
        return model
    log.info(
        "onnxruntime grades the images (%s, ready in %.0f s)",
        network.path.name,
        time.perf_counter() - started,
    )
    return network


def infer(args: argparse.Namespace, workspace: Workspace, job: JobReporter, device: torch.device) -> None:
    model: Network  # the checkpoint's, then what grades the images (no PyTorch copy kept)
    model, meta = load_checkpoint(args.checkpoint, device)
    plan = from_rank_0(lambda: plan_pool(args, workspace.db_url, meta))
    job.attach_run(plan.run_id)
    model = network_for(args, workspace, model, meta, device)  # after the plan's checks
    report = progress_reporter(job, workspace.db_url, plan)
    done = predict_share(args, workspace, device, model, meta, plan, report)
    predicted, skipped = sum_over_ranks(list(done), device, report)  # every rank has finished
    if rank() != 0:
        return
    report(force=True)
    out = args.out or submission_path(workspace, meta.get("run", "model"), plan.source)
    write_submission(out, workspace.db_url, plan)
    print(
        f"{predicted} predicted, {skipped} skipped, {plan.done_before} already predicted; submission: {out}"
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)
    if not args.checkpoint.is_file():
        log.error("%s: checkpoint not found", args.checkpoint)
        return 2
    workspace = Workspace.from_env()
    if rank() == 0:  # the other ranks wait for its plan before they touch the database
        migrate(workspace.db_url)
    try:
        # One job row, which rank 0 reports; every rank honours a cancel.
        with (
            JobReporter(workspace.db_url, args.job_id if rank() == 0 else None) as job,
            process_group(pick_device(args.device)) as device,
        ):
            infer(args, workspace, job, device)
    except (LookupError, ImportStopped, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
