"""Predict grades for a pool of images and store the probabilities under the model's version.

    python -m engine.infer --checkpoint FILE (--source NAME | --images DIR) [--out submission.csv] [--tta]

Writes a Kaggle-style submission CSV (id_code, diagnosis; the diagnosis on the model's 0-3
scale). Unreadable images are reported and skipped; the rest finish.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd
from sqlalchemy import select

from db.queries import unused_name
from db.runs import activate_first
from db.schema import Image, Prediction, Run, Source, utcnow
from db.session import migrate, read_scope, session_scope, upsert_insert
from engine.data import Sample, default_workers
from engine.jobs import JobReporter
from engine.models import load_checkpoint, pick_device
from engine.predictor import Predictions, default_batch_size, predict
from engine.sources import ImportStopped, import_source
from engine.workspace import Workspace


def register_model(db_url: str, checkpoint: Path, meta: dict) -> int:
    """The run row of a checkpoint; a checkpoint trained elsewhere gets one on first use."""
    with session_scope(db_url) as session:
        run = session.scalar(select(Run).where(Run.checkpoint == str(checkpoint)))
        if run is None:
            name = unused_name(session, Run.name, meta.get("run") or checkpoint.stem)
            run = Run(name=name, model_name=meta["model_name"], img_size=meta["image_size"],
                      config=meta.get("train_config", {}), status="done",
                      checkpoint=str(checkpoint), temperature=meta.get("temperature", 1.0),
                      calibration=meta.get("calibration", {}),
                      best_qwk=meta.get("metrics", {}).get("qwk"), finished_at=utcnow())
            session.add(run)
            session.flush()
            activate_first(session, run)
        return run.id


def source_samples(db_url: str, name: str) -> list[Sample]:
    with read_scope(db_url) as session:
        source = session.scalar(select(Source).where(Source.name == name))
        if source is None:
            names = ", ".join(session.scalars(select(Source.name))) or "none yet"
            raise LookupError(f"no source named {name!r} (sources: {names})")
        rows = session.execute(select(Image.id, Image.path, Image.name)
                               .where(Image.source_id == source.id).order_by(Image.id)).all()
        return [Sample(f"{source.root}/{path}", None, image_name, i) for i, path, image_name in rows]


def store_predictions(db_url: str, run_id: int, samples: list[Sample], result: Predictions) -> None:
    """Upsert one row per (model, image): running the same model again replaces its rows."""
    rows = [
        {"run_id": run_id, "image_id": samples[i].image_id, "p0": float(p[0]), "p1": float(p[1]),
         "p2": float(p[2]), "p3": float(p[3]), "grade": int(p.argmax()),
         "confidence": float(p.max()), "created_at": utcnow()}
        for i, p in zip(result.indices, result.probs)
    ]
    with session_scope(db_url) as session:
        insert = upsert_insert(session)
        for start in range(0, len(rows), 500):
            statement = insert(Prediction).values(rows[start:start + 500])
            session.execute(statement.on_conflict_do_update(
                index_elements=["run_id", "image_id"],
                set_={c: statement.excluded[c] for c in ("p0", "p1", "p2", "p3", "grade",
                                                         "confidence", "created_at")}))


def write_submission(path: Path, samples: list[Sample], result: Predictions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id_code": [samples[i].name for i in result.indices],
                  "diagnosis": result.grades.astype(int)}).to_csv(path, index=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--source", help="an imported source, by name")
    pool.add_argument("--images", type=Path, help="a folder of images (imported as a pool)")
    parser.add_argument("--out", type=Path, help="submission CSV (default: in the workspace)")
    parser.add_argument("--tta", action="store_true", help="average with the mirrored image")
    parser.add_argument("--batch-size", type=int, help="default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--device")
    parser.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    return parser.parse_args(argv)


def infer(args: argparse.Namespace, workspace: Workspace, job: JobReporter) -> Path:
    device = pick_device(args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    run_id = register_model(workspace.db_url, args.checkpoint.resolve(), meta)
    source = args.source
    if args.images is not None:
        report = import_source(workspace.db_url, "unlabelled", args.images, "unlabelled")
        print(report)
        source = report.source
    samples = source_samples(workspace.db_url, source)
    job.attach_run(run_id)

    def on_batch(done: int, total: int, rate: float) -> None:
        left = (total - done) / rate if rate else 0
        job.progress(done / total, f"{done}/{total} images, {rate:.1f} images/s, "
                                   f"{left:.0f} s left")

    batch_size = args.batch_size or default_batch_size(device)
    result = predict(model, meta, samples, device, batch_size, args.workers, args.tta,
                     workspace.cache, on_batch)
    for index, reason in result.failures:
        print(f"skipped {samples[index].name}: {reason}")
    store_predictions(workspace.db_url, run_id, samples, result)
    out = args.out or workspace.root / "submissions" / f"{meta.get('run', 'model')}-{source}.csv"
    write_submission(out, samples, result)
    print(f"{len(result.indices)} predicted, {len(result.failures)} skipped; submission: {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"error: {args.checkpoint}: checkpoint not found", file=sys.stderr)
        return 2
    workspace = Workspace.from_env()
    migrate(workspace.db_url)
    try:
        with JobReporter(workspace.db_url, args.job_id) as job:
            infer(args, workspace, job)
    except (LookupError, ImportStopped, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
