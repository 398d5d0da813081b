"""The 100k-image pool benchmark, run small on each backend: it finishes and reports every
figure."""

import subprocess
import sys
from pathlib import Path

from conftest import BOTH_BACKENDS

REPO = Path(__file__).resolve().parents[1]


@BOTH_BACKENDS
def test_pool_benchmark_runs_small_and_reports_its_figures(request, backend):
    if backend == "postgresql":
        request.getfixturevalue("postgres")  # skips, as other PostgreSQL tests, where none starts
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.pool",
            "--images",
            "150",
            "--predictions",
            "600",
            "--size",
            "32",
            "--batch-size",
            "16",
            "--workers",
            "0",
            "--repeat",
            "3",
            "--backend",
            backend,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"database {backend}" in done.stderr
    figures = {line[:48].strip(): float(line[48:]) for line in done.stdout.splitlines()}
    assert figures["images in the pool"] == 150
    assert figures["predictions in the database"] == 600  # the inference run and 3 in bulk
    assert figures["candidates of the queue's run"] > 0
    assert figures["already decided"] >= 3
    for name in (
        "inference, images/s in the first tenth",
        "inference, images/s in the last tenth",
        "RSS in the first tenth, MB",
        "RSS, largest in a later tenth, MB",
        "candidate query (claim_next), ms",
        "one decision (decide), ms",
        "progress per grade, ms",
        "last ten decisions, ms",
    ):
        assert figures[name] > 0, name
