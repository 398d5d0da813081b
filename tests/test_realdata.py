"""Real fundus photographs (../shared/realdata, research use only, never copied into the
repository): the eye crop on all of them, and a small fixed subset through the whole path
a user takes: import, preprocess, train, infer."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from sqlalchemy import func, select

from db.schema import Prediction
from db.session import migrate, session_scope
from engine.data.images import load_rgb
from engine.data.preprocess import find_field
from engine.data.sources import import_source
from engine.runtime.workspace import Workspace
from grades import from_aptos

REALDATA = ROOT.parent / "shared" / "realdata"
pytestmark = pytest.mark.skipif(
    not (REALDATA / "labels.csv").is_file(), reason="../shared/realdata is not here"
)
EDGE_TOLERANCE = 0.03  # of the field's diameter


@pytest.fixture(scope="module")
def labels() -> pd.DataFrame:
    table = pd.read_csv(REALDATA / "labels.csv")
    return table.assign(grade4=table["grade"].map(from_aptos))


def field_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """An independent look at the field: the box of the pixels well above the background
    level (flare included), after an opening that drops specks and notches."""
    brightest = img.max(axis=2)
    background, field = np.percentile(brightest, 2), np.percentile(brightest, 75)
    mask = (brightest > background + 0.2 * (field - background)).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    cols = np.flatnonzero(mask.sum(0) > 0.02 * img.shape[0])
    rows = np.flatnonzero(mask.sum(1) > 0.02 * img.shape[1])
    return cols[0], rows[0], cols[-1], rows[-1]


def edge_error(img: np.ndarray) -> float:
    """How far the found circle is from the field's edges, as a share of its diameter: the
    edges of the field's longer extent must match, and a field cut flat along the other
    must lie inside the circle."""
    cx, cy, r = find_field(img)
    left, top, right, bottom = field_box(img)
    along, across = ((cx, left, right), (cy, top, bottom))
    if bottom - top > right - left:
        along, across = across, along
    centre, low, high = along
    matched = [abs(centre - r - low), abs(centre + r - high)]
    centre, low, high = across
    outside = [max(0.0, centre - r - low), max(0.0, high - centre - r)]
    return max(matched + outside) / (2 * r)


def file_error(file: str) -> float:
    return edge_error(load_rgb(REALDATA / file))


def test_the_eye_crop_finds_the_field_of_every_real_photograph(labels):
    with ProcessPoolExecutor(os.cpu_count(), mp_context=get_context("fork")) as pool:
        errors = dict(zip(labels["file"], pool.map(file_error, labels["file"], chunksize=50), strict=True))
    failures = {file: round(e, 3) for file, e in errors.items() if e > EDGE_TOLERANCE}
    assert len(errors) == 1500 and not failures, f"{len(failures)} failures: {failures}"


def test_flare_around_the_field_is_not_taken_for_the_field():
    """This photograph's background is lifted to 20-40 by flare, past the fixed threshold."""
    img = load_rgb(REALDATA / "images" / "eyepacs_110_left.jpg")
    assert edge_error(img) < EDGE_TOLERANCE


def pick(labels: pd.DataFrame, per_grade: int, skip: int = 0) -> pd.DataFrame:
    """A fixed subset: the first images of each grade (0-3) of each dataset, by file name."""
    ordered = labels.sort_values("file")
    return ordered.groupby(["dataset", "grade4"]).nth(range(skip, skip + per_grade))


def copy_into(rows: pd.DataFrame, folder: Path, by_grade: bool) -> None:
    for row in rows.itertuples():
        target = folder / (str(row.grade4) if by_grade else "") / Path(row.file).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REALDATA / row.file, target)


def run(module: str, workspace: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_real_photographs_go_through_import_preprocess_training_and_inference(labels, tmp_path):
    """Copies of 40 photographs live in the test's temporary folder only."""
    copy_into(pick(labels, 3), tmp_path / "train", by_grade=True)
    copy_into(pick(labels, 1, skip=3), tmp_path / "validation", by_grade=True)
    copy_into(pick(labels, 1, skip=4).head(8), tmp_path / "pool", by_grade=False)
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    for folder, kind, role in (
        ("train", "folders", "train"),
        ("validation", "folders", "validation"),
        ("pool", "unlabelled", "unlabelled"),
    ):
        report = import_source(workspace.db_url, kind, tmp_path / folder, role, folder)
        assert report.added > 0 and not report.problems, report

    run(
        "engine.data.preprocess",
        workspace.root,
        "--in",
        str(tmp_path / "pool"),
        "--out",
        str(tmp_path / "pre"),
        "--size",
        "128",
    )
    for file in (tmp_path / "pool").iterdir():
        preprocessed = load_rgb(tmp_path / "pre" / file.name)
        assert preprocessed.shape == (128, 128, 3)
        cx, cy, r = find_field(preprocessed)  # the eye now fills the square
        assert abs(cx - 63.5) < 4 and r > 0.85 * 64

    done = run(
        "engine.training.train",
        workspace.root,
        "--from-db",
        "--model",
        "test_efficientnet",
        "--pretrained",
        "false",
        "--img-size",
        "64",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--name",
        "real",
    )
    assert "people kept apart" in done.stderr and "val QWK" in done.stdout
    checkpoint = workspace.weights / "real" / "best.pth"
    done = run(
        "engine.model.infer",
        workspace.root,
        "--checkpoint",
        str(checkpoint),
        "--source",
        "pool",
        "--out",
        str(tmp_path / "submission.csv"),
        "--workers",
        "0",
    )
    assert "onnxruntime grades the images" in done.stderr  # the default on a CPU
    submission = pd.read_csv(tmp_path / "submission.csv")
    assert len(submission) == 8 and submission["diagnosis"].between(0, 3).all()
    with session_scope(workspace.db_url) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 8
