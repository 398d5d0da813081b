import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parents[1]
# engine.training.train's options for the tiny test model, as the training tests run it.
TINY_TRAIN = [
    "--model",
    "test_efficientnet",
    "--img-size",
    "64",
    "--pretrained",
    "false",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--lr",
    "0.05",
]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Exporting a network to ONNX takes seconds even for a tiny one: the tests that are not about
# the CPU runtime run PyTorch, and those that are (test_onnx_network) say so.
os.environ["DR_CPU_RUNTIME"] = "pytorch"
# pytest runs one worker per core (-n auto in pyproject.toml): one thread each for PyTorch's
# OpenMP, and for the processes the tests start, instead of every worker taking every core.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.postgres import Server, Unavailable  # noqa: E402
from db.session import get_engine, migrate  # noqa: E402

# A test marked with this runs on SQLite and on a real PostgreSQL server: its db_url and
# workspace fixtures point at either.
BOTH_BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])


@pytest.fixture(autouse=True)
def main_module_kept():
    """AppTest installs its script as sys.modules["__main__"] and leaves it there; a process
    spawned after the test (the tiles Prefetcher's) would run that script again as it starts."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture
def backend() -> str:
    """The database that db_url and workspace use; BOTH_BACKENDS parametrizes it."""
    return "sqlite"


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the test session (bench/postgres.py). Without
    PostgreSQL the tests that need it skip, unless REQUIRE_POSTGRES=1 says they must run (CI)."""
    try:
        server = Server.start()
    except Unavailable as missing:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"REQUIRE_POSTGRES=1 but {missing}", pytrace=False)
        pytest.skip(str(missing))
    yield server
    server.stop()


def new_database(request, backend: str, sqlite_path: Path) -> str:
    """A migrated database of the test's own: the SQLite file, or one on the session's
    PostgreSQL server."""
    if backend == "postgresql":
        return request.getfixturevalue("postgres").migrated_database()
    url = f"sqlite:///{sqlite_path}"
    migrate(url)
    return url


@pytest.fixture
def db_url(request, backend: str, tmp_path: Path):
    url = new_database(request, backend, tmp_path / "test.sqlite")
    yield url
    get_engine(url).dispose()  # the server counts connections: a finished test's close


@pytest.fixture
def empty_db_url(request, backend: str, tmp_path: Path):
    """A database of the test's own without any table."""
    url = (
        request.getfixturevalue("postgres").create_database()
        if backend == "postgresql"
        else f"sqlite:///{tmp_path / 'empty.sqlite'}"
    )
    yield url
    get_engine(url).dispose()


def write_image(path: Path, size: tuple[int, int] = (64, 48), value: int = 120) -> Path:
    """A small valid image; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    pixels[::7] = 30  # some structure, so that compressed files have real content
    PILImage.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset in every layout, generated once per test session."""
    from engine.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, seed=3, n_train=24, n_test=8, n_val=16, n_messidor=4, size=128)
    return out


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch, request, backend: str):
    """A migrated workspace of the test's own, which the app (AppTest) opens too; its
    database is on PostgreSQL where BOTH_BACKENDS says so."""
    from engine.runtime.workspace import Workspace

    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("DR_DEMO", "0")
    monkeypatch.delenv("DR_DATABASE_URL", raising=False)
    workspace = Workspace.from_env()
    workspace.root.mkdir(parents=True)
    url = new_database(request, backend, workspace.root / "dr.sqlite")
    if backend != "sqlite":
        monkeypatch.setenv("DR_DATABASE_URL", url)  # as a team's server names it
    yield workspace
    get_engine(url).dispose()


def tiny_checkpoint(path: Path, image_size: int = 64, temperature: float = 1.0, members: int = 1) -> Path:
    """A checkpoint of timm's tiny test_efficientnet (random weights, seed 0), with the meta
    that training writes: its own preprocessing, normalisation and temperature; with
    `members` > 1 an Ensemble of that many, as `--folds` writes."""
    import torch

    from engine.data.preprocess import PreprocessConfig
    from engine.model.networks import Ensemble, create_model, model_mean_std, save_checkpoint

    torch.manual_seed(0)
    mean, std = model_mean_std("test_efficientnet")
    nets = [create_model("test_efficientnet") for _ in range(members)]
    save_checkpoint(
        path,
        nets[0] if members == 1 else Ensemble(nets),
        {
            **({"members": members} if members > 1 else {}),
            "model_name": "test_efficientnet",
            "image_size": image_size,
            "run": path.stem,
            "mean": list(mean),
            "std": list(std),
            "temperature": temperature,
            "preprocess": PreprocessConfig(size=image_size).to_dict(),
        },
    )
    return path


def job_row(workspace, job_id: int):
    from db.schema import Job
    from db.session import session_scope

    with session_scope(workspace.db_url) as session:
        return session.get(Job, job_id)


def wait_for_job(workspace, job_id: int, done, timeout: float = 120):
    """The job's row once `done(row)` holds; its log's tail in the failure if it never does."""
    from engine.runtime import jobs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs.mark_dead_jobs(workspace.db_url)
        job = job_row(workspace, job_id)
        if done(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stuck: {job.status} {job.message}\n{jobs.log_tail(job.log_path)}")


def open_page(page: str | None = None):
    """The app run headless, switched to views/<page>.py; it must not raise."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def page_text(at) -> str:
    """Every sentence the page shows, for `in` checks."""
    return " ".join(
        e.value for e in [*at.info, *at.markdown, *at.caption, *at.warning, *at.success, *at.error, *at.code]
    )


# What engine.model.calibration.calibration_summary stores: 120 of the 200 validation images reach
# 0.70 after calibration, 102 of those (85 %) are right.
CALIBRATION = {
    "temperature": 1.8,
    "bounded": False,
    "images": 200,
    "ece_before": 0.12,
    "ece_after": 0.034,
    "nll_before": 0.95,
    "nll_after": 0.81,
    "reliability_before": [
        {"lo": 0.6, "hi": 0.7, "count": 50, "confidence": 0.65, "accuracy": 0.5},
        {"lo": 0.9, "hi": 1.0, "count": 150, "confidence": 0.96, "accuracy": 0.8},
    ],
    "reliability_after": [
        {"lo": 0.5, "hi": 0.6, "count": 80, "confidence": 0.56, "accuracy": 0.55},
        {"lo": 0.8, "hi": 0.9, "count": 120, "confidence": 0.84, "accuracy": 0.85},
    ],
    "threshold": 0.7,
    "confident": 120,
    "confident_right": 102,
}
