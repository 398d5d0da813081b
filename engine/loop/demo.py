"""The demo workspace: synthetic APTOS-style data, generated and imported on first start.

python -m engine.loop.demo [--train N --test N --val N --size PX]
"""

import argparse
import logging
import sys

from sqlalchemy import func, select

from cli import HelpFormatter, setup_logging
from db.schema import Source
from db.session import migrate, read_scope
from engine.data import synth
from engine.data.sources import import_source
from engine.runtime.jobs import JobReporter
from engine.runtime.workspace import Workspace

log = logging.getLogger(__name__)

# (folder inside the generated data, kind, role, name shown in the app)
DEMO_SOURCES = (
    ("aptos", "aptos", "train", "demo APTOS train"),
    ("aptos", "aptos", "unlabelled", "demo APTOS test"),
    ("validation", "folders", "validation", "demo high-quality validation"),
)


def is_empty(db_url: str) -> bool:
    with read_scope(db_url) as session:
        return session.scalar(select(func.count()).select_from(Source)) == 0


def demo_args(setting: str) -> list[str]:
    """engine.loop.demo's arguments for the DR_DEMO setting: "1", the full demo; a number of
    training photographs above 1, a smaller one (half as many to predict, a quarter to
    validate), which builds in seconds. ValueError for anything else ("0" starts no demo)."""
    if setting == "1":
        return []
    if not setting.isdigit() or int(setting) < 8:
        raise ValueError(
            f"DR_DEMO is 0 (no demo), 1 (the demo) or a number of training "
            f"photographs of at least 8, not {setting!r}"
        )
    train = int(setting)
    return ["--train", str(train), "--test", str(max(train // 2, 4)), "--val", str(max(train // 4, 4))]


def build_demo(workspace: Workspace, job: JobReporter, **sizes: int) -> None:
    """Generate the synthetic datasets (70% of the progress bar), then import them."""
    out = workspace.datasets / "demo"

    def generated(done: int, total: int) -> None:
        job.progress(0.7 * done / total, f"drawing synthetic photographs: {done}/{total}")

    synth.write_dataset(out, progress=generated, **sizes)
    for step, (folder, kind, role, name) in enumerate(DEMO_SOURCES):
        start = 0.7 + 0.1 * step

        def imported(done: int, total: int, start: float = start, name: str = name) -> None:
            job.progress(start + 0.1 * done / total, f"importing {name}: {done}/{total}")

        log.info("%s", import_source(workspace.db_url, kind, out / folder, role, name, imported))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.loop.demo", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--train",
        type=int,
        dest="n_train",
        default=synth.DEMO_COUNTS["train"],
        help="labelled training photographs",
    )
    parser.add_argument(
        "--test",
        type=int,
        dest="n_test",
        default=synth.DEMO_COUNTS["test"],
        help="unlabelled photographs to predict",
    )
    parser.add_argument(
        "--val", type=int, dest="n_val", default=synth.DEMO_COUNTS["val"], help="validation photographs"
    )
    parser.add_argument("--size", type=int, default=synth.DEMO_SIZE, help="photograph height in pixels")
    parser.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    sizes = vars(parser.parse_args(argv))
    job_id = sizes.pop("job_id")
    setup_logging()
    workspace = Workspace.from_env()
    migrate(workspace.db_url)
    with JobReporter(workspace.db_url, job_id) as job:
        build_demo(workspace, job, **sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
