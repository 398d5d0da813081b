"""Inference: one prediction per image in the database, the submission CSV, corrupt images."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sqlalchemy import func, select

from conftest import ROOT
from db.schema import Image, Prediction, Run
from db.session import migrate, session_scope
from engine.data import Sample
from engine.models import create_model, model_mean_std, save_checkpoint
from engine.predictor import predict
from engine.preprocess import PreprocessConfig
from engine.sources import import_source
from engine.workspace import Workspace


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("test_efficientnet")
    mean, std = model_mean_std("test_efficientnet")
    path = tmp_path / "model.pth"
    save_checkpoint(path, model, {"model_name": "test_efficientnet", "image_size": 64,
                                  "mean": list(mean), "std": list(std), "run": "tiny",
                                  "preprocess": PreprocessConfig(size=64).to_dict(),
                                  "temperature": 2.0})
    return path


def infer_cli(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine.infer", "--workers", "0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_source_inference_stores_probabilities_and_writes_submission(tiny_data, tmp_path, checkpoint):
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    out = tmp_path / "submission.csv"
    done = infer_cli(workspace.root, "--checkpoint", str(checkpoint), "--source", "pool",
                     "--out", str(out), "--tta")
    assert done.returncode == 0, done.stderr
    with session_scope(workspace.db_url) as session:
        run = session.scalar(select(Run))
        rows = session.scalars(select(Prediction)).all()
        names = dict(session.execute(select(Image.id, Image.name)).all())
    assert run.name == "tiny" and run.temperature == 2.0
    assert len(rows) == 8 and {r.run_id for r in rows} == {run.id}
    for row in rows:
        probs = np.array([row.p0, row.p1, row.p2, row.p3])
        assert probs.sum() == pytest.approx(1, abs=1e-5)
        assert row.grade == probs.argmax() and row.confidence == pytest.approx(probs.max())
    submission = pd.read_csv(out)
    assert list(submission.columns) == ["id_code", "diagnosis"]
    assert dict(zip(submission.id_code, submission.diagnosis)) == {names[r.image_id]: r.grade for r in rows}

    again = infer_cli(workspace.root, "--checkpoint", str(checkpoint), "--source", "pool")
    assert again.returncode == 0, again.stderr
    with session_scope(workspace.db_url) as session:  # the same model again replaces its rows
        assert session.scalar(select(func.count()).select_from(Prediction)) == 8


def test_a_corrupt_image_is_reported_and_the_rest_are_predicted(tiny_data, tmp_path, checkpoint):
    pool = tmp_path / "pool"
    pool.mkdir()
    for file in sorted((tiny_data / "aptos" / "test_images").iterdir())[:3]:
        (pool / file.name).write_bytes(file.read_bytes())
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "unlabelled", pool, "unlabelled", "pool")
    victim = sorted(pool.iterdir())[1]
    victim.write_bytes(b"garbage that used to be a photograph")  # broken after the import
    done = infer_cli(workspace.root, "--checkpoint", str(checkpoint), "--source", "pool")
    assert done.returncode == 0, done.stderr
    assert f"skipped {victim.stem}: " in done.stdout and "2 predicted, 1 skipped" in done.stdout
    with session_scope(workspace.db_url) as session:
        predicted = set(session.scalars(select(Image.name).join(Prediction, Prediction.image_id == Image.id)))
    assert predicted == {p.stem for p in pool.iterdir()} - {victim.stem}


def test_images_folder_and_clear_errors(tiny_data, tmp_path, checkpoint):
    done = infer_cli(tmp_path / "ws", "--checkpoint", str(checkpoint), "--images",
                     str(tiny_data / "aptos" / "test_images"))
    assert done.returncode == 0, done.stderr and "8 predicted" in done.stdout
    missing = infer_cli(tmp_path / "ws", "--checkpoint", str(tmp_path / "nope.pth"), "--source", "x")
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr
    unknown = infer_cli(tmp_path / "ws", "--checkpoint", str(checkpoint), "--source", "nope")
    assert unknown.returncode == 2 and "no source named 'nope'" in unknown.stderr


def test_temperature_softens_the_probabilities(tiny_data, checkpoint):
    from engine.models import load_checkpoint
    model, meta = load_checkpoint(checkpoint)
    samples = [Sample(str(p)) for p in sorted((tiny_data / "aptos" / "test_images").iterdir())]
    hot = predict(model, meta, samples, torch.device("cpu"), workers=0)
    cold = predict(model, {**meta, "temperature": 1.0}, samples, torch.device("cpu"), workers=0)
    assert (hot.grades == cold.grades).all()
    assert (hot.probs.max(1) < cold.probs.max(1)).all()
