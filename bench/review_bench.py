"""Server time of the Review page's queries at 1k and 100k predictions, and the ratio.

    .venv/bin/python -m bench.review_bench [--sizes 1000 100000] [--reviewed 0.1] [--repeat 30]

Each size gets a fresh temporary SQLite database: an unlabelled pool with one prediction per
image, a validation source (excluded from the queue), a share of the candidates already
decided least confident first (as a reviewer working the default order leaves them), and a
second reviewer's claim. Timed, median of --repeat calls: the candidate query (claim_next,
which every rerun of the page makes), one decision (decide), and the page's other per-rerun
queries (progress per grade, the reviewer's last ten decisions).
"""

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import insert

from cli import HelpFormatter, setup_logging
from db.reviews import QueueFilter, claim_next, decide, progress, recent_decisions
from db.schema import Image, Prediction, Review, Run, Source
from db.session import migrate, session_scope

VALIDATION = 200


def fill(db_url: str, size: int, reviewed: float) -> tuple[int, int, int]:
    """The database of one size; returns the run id, the candidates and those decided."""
    draw = random.Random(0)
    with session_scope(db_url) as session:
        pool = Source(name="pool", kind="unlabelled", root="/pool", role="unlabelled")
        validation = Source(name="validation", kind="folders", root="/val", role="validation")
        run = Run(
            name="bench", model_name="test_efficientnet", img_size=64, status="done", checkpoint="/bench.pth"
        )
        session.add_all([pool, validation, run])
        session.flush()
        images = [
            {"source_id": pool.id, "path": f"{i}.png", "name": f"p{i}", "width": 8, "height": 8}
            for i in range(size)
        ]
        images += [
            {
                "source_id": validation.id,
                "path": f"{i}.png",
                "name": f"v{i}",
                "width": 8,
                "height": 8,
                "grade": i % 4,
            }
            for i in range(VALIDATION)
        ]
        session.execute(insert(Image), images)
        predictions = []
        for image_id in range(1, size + VALIDATION + 1):
            probs = [draw.random() ** 3 for _ in range(4)]
            probs = [p / sum(probs) for p in probs]
            grade = max(range(4), key=probs.__getitem__)
            predictions.append(
                {
                    "run_id": run.id,
                    "image_id": image_id,
                    "p0": probs[0],
                    "p1": probs[1],
                    "p2": probs[2],
                    "p3": probs[3],
                    "grade": grade,
                    "confidence": probs[grade],
                }
            )
        session.execute(insert(Prediction), predictions)
        candidates = sorted(
            (p for p in predictions[:size] if p["confidence"] >= 0.7), key=lambda p: p["confidence"]
        )
        done = candidates[: int(len(candidates) * reviewed)]
        if done:
            session.execute(
                insert(Review),
                [
                    {
                        "image_id": p["image_id"],
                        "run_id": run.id,
                        "decision": "accept",
                        "grade": p["grade"],
                        "reviewer": "earlier",
                    }
                    for p in done
                ],
            )
        return run.id, len(candidates), len(done)


def median_ms(repeat: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def queue_times(db_url: str, run_id: int, repeat: int) -> dict[str, float]:
    """Median ms of the Review page's queries on the queue of `run_id`, while another reviewer
    holds its head; makes `repeat` decisions."""
    queue = QueueFilter(run_id)
    claim_next(db_url, "other", queue)  # someone else holds the head of the queue
    decisions: list[float] = []
    for _ in range(repeat):
        candidate = claim_next(db_url, "me", queue)
        if candidate is None:
            raise RuntimeError(f"the queue ran out after {len(decisions)} decisions: --repeat is too large")
        started = time.perf_counter()
        decide(db_url, "me", candidate.image_id, run_id, "accept")
        decisions.append(time.perf_counter() - started)
    return {
        "candidate query (claim_next), ms": median_ms(repeat, lambda: claim_next(db_url, "me", queue)),
        "one decision (decide), ms": statistics.median(decisions) * 1000,
        "progress per grade, ms": median_ms(repeat, lambda: progress(db_url, run_id, 0.7)),
        "last ten decisions, ms": median_ms(repeat, lambda: recent_decisions(db_url, "me")),
    }


def measure(size: int, reviewed: float, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        db_url = f"sqlite:///{Path(folder) / 'bench.sqlite'}"
        migrate(db_url)
        run_id, candidates, done = fill(db_url, size, reviewed)
        return {
            "candidates (confidence >= 0.70)": candidates,
            "already decided": done + repeat,
            **queue_times(db_url, run_id, repeat),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        default=[1000, 100_000],
        help="predictions in the small and the large database",
    )
    parser.add_argument("--reviewed", type=float, default=0.1, help="share of the candidates already decided")
    parser.add_argument(
        "--repeat", type=int, default=30, help="calls of each query timed (the median counts)"
    )
    args = parser.parse_args()
    setup_logging()
    small, large = (measure(size, args.reviewed, args.repeat) for size in args.sizes)
    print(
        f"{'predictions (median of ' + str(args.repeat) + ' calls)':36} "
        f"{args.sizes[0]:>10} {args.sizes[1]:>10} {'ratio':>8}"
    )
    for name in small:
        digits = 0 if isinstance(small[name], int) else 2
        print(
            f"{name:36} {small[name]:10.{digits}f} {large[name]:10.{digits}f} "
            f"{large[name] / small[name]:8.1f}"
        )


if __name__ == "__main__":
    main()
