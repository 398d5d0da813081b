"""A pool of 100k images: inference over it, then the review queue at 1M predictions.

    .venv/bin/python -m bench.pool [--images 100000] [--predictions 1000000] [--size 64]
                                   [--batch-size 64] [--workers N] [--repeat 30]
                                   [--backend sqlite|postgresql]

1. Builds the pool in a temporary workspace: a few distinct synthetic photographs `--size` px
   high, linked under `--images` names, and one database row each, in a SQLite file or, with
   `--backend postgresql`, on a throwaway PostgreSQL server on localhost (bench/postgres.py).
2. Predicts every image with a tiny model (timm's test_efficientnet, random weights) the way
   engine.model.infer does: through the preprocessing cache, each batch stored as it is made. The
   resident memory of this process is sampled after every batch, and the time at every tenth
   of the pool: memory should stay flat and the rate steady (time growing linearly).
3. Inserts in bulk the predictions of further runs up to `--predictions` in all, decides 10 %
   of the last run's candidates, and times the Review page's queries on that run's queue
   (median of `--repeat`): the candidate query should take <= 20 ms and a decision <= 50 ms.
The figures are printed at the end; the progress goes to stderr meanwhile.
"""

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import func, insert, select, text

from bench.postgres import Server
from bench.review_bench import queue_times
from cli import HelpFormatter, setup_logging
from db.schema import Image, Prediction, Review, Run, Source, utcnow
from db.session import get_engine, migrate, session_scope
from engine.data.datasets import default_workers
from engine.data.preprocess import PreprocessConfig
from engine.data.synth import write_dataset
from engine.model.infer import source_samples, store_predictions
from engine.model.networks import create_model, model_mean_std
from engine.model.predictor import predict_batches
from grades import REVIEW_THRESHOLD

MODEL = "test_efficientnet"
DISTINCT = 32  # distinct photographs behind the pool's names
PER_FOLDER = 1000
TENTHS = 10


def rss_mb() -> float:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_pool(folder: Path, db_url: str, images: int, size: int) -> None:
    """`images` files under folder/pool (hard links to DISTINCT synthetic photographs) and
    their rows."""
    write_dataset(
        folder / "synth", seed=3, n_train=0, n_test=DISTINCT, n_val=0, n_messidor=0, size=size, workers=1
    )
    originals = sorted((folder / "synth" / "aptos" / "test_images").iterdir())
    root = folder / "pool"
    paths = [f"{i // PER_FOLDER:03d}/{i:06d}.png" for i in range(images)]
    for n, path in enumerate(paths):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        os.link(originals[n % DISTINCT], root / path)
    with session_scope(db_url) as session:
        source = Source(name="pool", kind="unlabelled", root=str(root), role="unlabelled")
        session.add(source)
        session.flush()
        session.connection().execute(
            insert(Image),
            [
                {
                    "source_id": source.id,
                    "path": path,
                    "name": Path(path).stem,
                    "width": size,
                    "height": size,
                    "extra": {},
                }
                for path in paths
            ],
        )


def new_run(db_url: str, name: str, size: int) -> int:
    with session_scope(db_url) as session:
        run = Run(name=name, model_name=MODEL, img_size=size, status="done", checkpoint=f"/bench/{name}.pth")
        session.add(run)
        session.flush()
        return run.id


def infer_pool(
    db_url: str, cache: Path, size: int, batch_size: int, workers: int
) -> tuple[int, list[tuple[int, float, float]]]:
    """Predict the pool as engine.model.infer does; the run id and, at every tenth of the pool,
    (images done, seconds, the largest RSS in MB sampled after each batch of that tenth)."""
    mean, std = model_mean_std(MODEL)
    meta = {
        "preprocess": PreprocessConfig(size=size).to_dict(),
        "mean": mean,
        "std": std,
        "image_size": size,
        "temperature": 1.0,
    }
    model = create_model(MODEL)
    run_id = new_run(db_url, "inference", size)
    _, samples = source_samples(db_url, "pool")
    marks: list[tuple[int, float, float]] = []
    done, peak = 0, 0.0
    started = time.perf_counter()
    for batch in predict_batches(
        model, meta, samples, torch.device("cpu"), batch_size, workers, cache_root=cache
    ):
        store_predictions(db_url, run_id, samples, batch)
        done += len(batch.indices) + len(batch.failures)
        peak = max(peak, rss_mb())
        if done >= len(samples) * (len(marks) + 1) / TENTHS:
            marks.append((done, time.perf_counter() - started, peak))
            print(
                f"{done}/{len(samples)} images predicted, {marks[-1][1]:.0f} s, RSS up to {peak:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
            peak = 0.0
    return run_id, marks


def bulk_predictions(db_url: str, run_id: int, image_ids: np.ndarray, seed: int) -> None:
    """One prediction per image for `run_id`, with skewed random probabilities, so that a
    share of them reaches the review threshold."""
    draw = np.random.default_rng(seed)
    probs = draw.random((len(image_ids), 4)) ** 3
    probs /= probs.sum(1, keepdims=True)
    grades = probs.argmax(1)
    now = utcnow()
    rows = [
        {
            "run_id": run_id,
            "image_id": int(i),
            "p0": float(p[0]),
            "p1": float(p[1]),
            "p2": float(p[2]),
            "p3": float(p[3]),
            "grade": int(g),
            "confidence": float(p[g]),
            "created_at": now,
        }
        for i, p, g in zip(image_ids, probs, grades, strict=True)
    ]
    with session_scope(db_url) as session:
        session.connection().execute(insert(Prediction), rows)


def decide_share(db_url: str, run_id: int, share: float) -> tuple[int, int]:
    """Accept the least confident `share` of the run's candidates, as a reviewer working the
    default order leaves them; (candidates, decided)."""
    with session_scope(db_url) as session:
        candidates = session.execute(
            select(Prediction.image_id, Prediction.grade)
            .where(Prediction.run_id == run_id, Prediction.confidence >= REVIEW_THRESHOLD)
            .order_by(Prediction.confidence)
        ).all()
        done = candidates[: int(len(candidates) * share)]
        if done:
            session.execute(
                insert(Review),
                [
                    {"image_id": i, "run_id": run_id, "decision": "accept", "grade": g, "reviewer": "earlier"}
                    for i, g in done
                ],
            )
        return len(candidates), len(done)


def inference_figures(marks: list[tuple[int, float, float]]) -> dict[str, float]:
    """Rates and memory of the first and last tenth of the pool, from infer_pool's marks."""
    steps = [
        (done - before[0], seconds - before[1], mb)
        for before, (done, seconds, mb) in pairwise([(0, 0, 0.0), *marks])
    ]
    total, seconds, _ = marks[-1]
    return {
        "images in the pool": total,
        "inference, s": seconds,
        "inference, images/s": total / seconds,
        "inference, images/s in the first tenth": steps[0][0] / steps[0][1],
        "inference, images/s in the last tenth": steps[-1][0] / steps[-1][1],
        "RSS in the first tenth, MB": steps[0][2],
        "RSS, largest in a later tenth, MB": max(mb for *_, mb in steps[1:] or steps),
    }


@contextmanager
def database(backend: str, folder: Path) -> Iterator[str]:
    """The URL of a new, migrated database: a SQLite file in `folder`, or one on a PostgreSQL
    server that lives as long as the context."""
    server = Server.start() if backend == "postgresql" else None
    try:
        url = server.create_database() if server else f"sqlite:///{folder / 'bench.sqlite'}"
        migrate(url)
        print(f"database {url}", file=sys.stderr)
        yield url
        get_engine(url).dispose()
    finally:
        if server:
            server.stop()


def measure(
    folder: Path,
    db_url: str,
    images: int,
    predictions: int,
    size: int,
    batch_size: int,
    workers: int,
    repeat: int,
) -> dict[str, float]:
    """The benchmark's figures, by name, on the empty database `db_url`."""
    started = time.perf_counter()
    build_pool(folder, db_url, images, size)
    built = time.perf_counter() - started
    run_id, marks = infer_pool(db_url, folder / "cache", size, batch_size, workers)
    with session_scope(db_url) as session:
        image_ids = np.array(
            session.scalars(select(Prediction.image_id).where(Prediction.run_id == run_id)).all()
        )
    started = time.perf_counter()
    for n in range(max(1, predictions // images - 1)):
        run_id = new_run(db_url, f"bulk {n}", size)
        bulk_predictions(db_url, run_id, image_ids, seed=n)
    inserted = time.perf_counter() - started
    candidates, decided = decide_share(db_url, run_id, 0.1)
    with session_scope(db_url) as session:
        stored = session.execute(select(func.count(Prediction.id))).scalar_one()
        if session.get_bind().dialect.name == "postgresql":
            # The statistics that autovacuum gathers on a server soon after such a load: the
            # planner's choices on the empty tables' statistics are not what reviewers get.
            session.execute(text("ANALYZE"))
    return {
        "pool built (files and rows), s": built,
        **inference_figures(marks),
        "predictions in the database": stored,
        "bulk insert of the other runs, s": inserted,
        "candidates of the queue's run": candidates,
        "already decided": decided + repeat,
        **queue_times(db_url, run_id, repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", type=int, default=100_000, help="photographs in the pool")
    parser.add_argument(
        "--predictions",
        type=int,
        default=1_000_000,
        help="predictions in all: the inference run's and further runs' in bulk",
    )
    parser.add_argument("--size", type=int, default=64, help="photograph height in pixels")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward")
    parser.add_argument("--workers", type=int, default=default_workers(), help="loader worker processes")
    parser.add_argument(
        "--repeat", type=int, default=30, help="calls of each query timed (the median counts)"
    )
    parser.add_argument(
        "--backend",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the database: a SQLite file, or a throwaway PostgreSQL server",
    )
    args = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as folder, database(args.backend, Path(folder)) as url:
        figures = measure(
            Path(folder),
            url,
            args.images,
            args.predictions,
            args.size,
            args.batch_size,
            args.workers,
            args.repeat,
        )
    for name, value in figures.items():
        print(f"{name:48} {value:12.{0 if isinstance(value, int) else 2}f}")


if __name__ == "__main__":
    main()
