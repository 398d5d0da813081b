"""Inference: one prediction per image in the database, the submission CSV, corrupt images,
the pool shared among torchrun processes, and runs that resume where a crash or cancel left."""

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, wait_for_job, write_image
from sqlalchemy import func, select

from db.schema import Image, Prediction, Run
from db.session import migrate, session_scope
from db.users import LOCAL
from engine.data.datasets import Sample
from engine.data.preprocess import PreprocessConfig
from engine.data.sources import import_source
from engine.model import infer
from engine.model.networks import create_model, model_mean_std, save_checkpoint
from engine.model.predictor import predict
from engine.runtime import jobs
from engine.runtime.workspace import Workspace


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("test_efficientnet")
    mean, std = model_mean_std("test_efficientnet")
    path = tmp_path / "model.pth"
    save_checkpoint(
        path,
        model,
        {
            "model_name": "test_efficientnet",
            "image_size": 64,
            "mean": list(mean),
            "std": list(std),
            "run": "tiny",
            "preprocess": PreprocessConfig(size=64).to_dict(),
            "temperature": 2.0,
        },
    )
    return path


def infer_cli(
    workspace: Path, *args: str, processes: int = 1, runtime: str = "pytorch"
) -> subprocess.CompletedProcess:
    """engine.model.infer in a process of its own; on PyTorch unless `runtime` says onnxruntime, the
    default outside the tests (conftest)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DR_WORKSPACE": str(workspace),
        "HF_HUB_OFFLINE": "1",
        "DR_CPU_RUNTIME": runtime,
    }
    launcher = (
        [sys.executable]
        if processes == 1
        else [
            str(Path(sys.executable).with_name("torchrun")),
            "--standalone",
            f"--nproc-per-node={processes}",
        ]
    )
    return subprocess.run(
        [*launcher, "-m", "engine.model.infer", "--workers", "0", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def pool_workspace(tmp_path: Path, tiny_data: Path) -> Workspace:
    """A workspace whose source "pool" holds the 8 images of the synthetic APTOS test set."""
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", "pool")
    return workspace


def stored(workspace: Workspace) -> dict[int, datetime]:
    """When each predicted image got its prediction, by image id."""
    with session_scope(workspace.db_url) as session:
        return dict(session.execute(select(Prediction.image_id, Prediction.created_at)).all())


def test_source_inference_stores_probabilities_and_writes_submission(tiny_data, tmp_path, checkpoint):
    workspace = pool_workspace(tmp_path, tiny_data)
    out = tmp_path / "submission.csv"
    done = infer_cli(
        workspace.root,
        "--checkpoint",
        str(checkpoint),
        "--source",
        "pool",
        "--out",
        str(out),
        "--tta",
        runtime="onnxruntime",
    )
    assert done.returncode == 0, done.stderr
    assert "onnxruntime grades the images" in done.stderr  # the default on a CPU
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
    assert dict(zip(submission.id_code, submission.diagnosis, strict=True)) == {
        names[r.image_id]: r.grade for r in rows
    }

    again = infer_cli(workspace.root, "--checkpoint", str(checkpoint), "--source", "pool")
    assert again.returncode == 0, again.stderr  # the same model again predicts nothing new
    assert "0 predicted, 0 skipped, 8 already predicted" in again.stdout
    with session_scope(workspace.db_url) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 8


def test_a_source_name_cannot_lead_the_submission_out_of_the_workspace(
    tiny_data, tmp_path, checkpoint, monkeypatch, capsys
):
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    name = "../../../../escaped/**pool**"  # a source's name is free text
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "unlabelled", name)
    monkeypatch.setenv("DR_WORKSPACE", str(workspace.root))  # in this process: no start-up
    assert infer.main(["--checkpoint", str(checkpoint), "--source", name, "--workers", "0"]) == 0
    out = workspace.root / "submissions" / "tiny-.._.._.._.._escaped___pool__.csv"
    assert capsys.readouterr().out.strip().endswith(f"submission: {out}") and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "ws"]
    assert (
        infer.submission_path(workspace, "tiny", "/etc/x")
        == workspace.root / "submissions" / "tiny-_etc_x.csv"
    )


def test_two_processes_share_the_pool_and_rank_0_writes_the_whole_submission(tiny_data, tmp_path, checkpoint):
    workspace = pool_workspace(tmp_path, tiny_data)
    out = tmp_path / "submission.csv"
    done = infer_cli(
        workspace.root,
        "--checkpoint",
        str(checkpoint),
        "--source",
        "pool",
        "--out",
        str(out),
        "--batch-size",
        "1",
        processes=2,
    )
    assert done.returncode == 0, done.stderr
    # Summed over both ranks: an image predicted by both would count twice.
    assert "8 predicted, 0 skipped, 0 already predicted" in done.stdout, done.stderr
    assert done.stdout.count("submission:") == 1  # rank 0 alone writes it
    with session_scope(workspace.db_url) as session:
        grades = dict(
            session.execute(
                select(Image.name, Prediction.grade).join(Prediction, Prediction.image_id == Image.id)
            ).all()
        )
    assert len(grades) == 8
    submission = pd.read_csv(out)
    assert dict(zip(submission.id_code, submission.diagnosis, strict=True)) == grades


def test_a_crash_keeps_the_batches_done_and_a_rerun_predicts_only_the_rest(
    tiny_data, tmp_path, checkpoint, monkeypatch, capsys
):
    workspace = pool_workspace(tmp_path, tiny_data)
    monkeypatch.setenv("DR_WORKSPACE", str(workspace.root))
    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM
    store, calls = infer.store_predictions, []

    def crash_at_the_third_batch(*args) -> None:
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("power cut")
        store(*args)

    run = ["--checkpoint", str(checkpoint), "--source", "pool", "--batch-size", "2", "--workers", "0"]
    monkeypatch.setattr(infer, "store_predictions", crash_at_the_third_batch)
    with pytest.raises(RuntimeError, match="power cut"):
        infer.main(run)
    kept = stored(workspace)
    assert len(kept) == 4  # the two batches done before the crash

    monkeypatch.setattr(infer, "store_predictions", store)
    assert infer.main(run) == 0
    assert "4 predicted, 0 skipped, 4 already predicted" in capsys.readouterr().out
    resumed = stored(workspace)
    assert len(resumed) == 8 and {i: resumed[i] for i in kept} == kept  # those kept untouched

    assert infer.main([*run, "--redo"]) == 0
    assert "8 predicted, 0 skipped, 0 already predicted" in capsys.readouterr().out
    redone = stored(workspace)
    assert len(redone) == 8 and all(redone[i] > resumed[i] for i in redone)


def test_a_job_on_two_processes_is_one_job_that_cancels_and_resumes(tmp_path, checkpoint):
    for i in range(600):  # enough images at batch size 1 to outlast the cancel
        write_image(tmp_path / "big" / f"b{i:03}.png", (64, 48), value=60 + i % 100)
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "unlabelled", tmp_path / "big", "unlabelled", "big")
    args = ["--checkpoint", str(checkpoint), "--source", "big", "--batch-size", "1", "--workers", "0"]
    job_id = jobs.start_job(workspace, "infer", "engine.model.infer", args, processes=2, user=LOCAL)
    job = wait_for_job(workspace, job_id, lambda j: j.progress > 0 or j.status not in jobs.ACTIVE)
    assert job.status == "running", jobs.log_tail(job.log_path)
    assert "torch.distributed.run" in Path(f"/proc/{job.pid}/cmdline").read_text()  # torchrun's
    jobs.cancel_job(workspace.db_url, job_id, user=LOCAL)
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE)
    assert job.status == "cancelled" and job.error is None, jobs.log_tail(job.log_path)
    jobs._children[(workspace.db_url, job_id)].wait(timeout=60)  # every rank has stopped
    kept = len(stored(workspace))
    assert 0 < kept < 600

    job_id = jobs.start_job(workspace, "infer", "engine.model.infer", args, processes=2, user=LOCAL)
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE)
    assert job.status == "done" and job.progress == 1.0, jobs.log_tail(job.log_path)
    assert len(stored(workspace)) == 600
    summary = f"{600 - kept} predicted, 0 skipped, {kept} already predicted"
    assert summary in jobs.log_tail(job.log_path)


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
    assert f"WARNING skipped {victim.stem}: " in done.stderr and "2 predicted, 1 skipped" in done.stdout
    with session_scope(workspace.db_url) as session:
        predicted = set(session.scalars(select(Image.name).join(Prediction, Prediction.image_id == Image.id)))
    assert predicted == {p.stem for p in pool.iterdir()} - {victim.stem}


def test_a_folder_of_images_is_imported_and_predicted(tiny_data, tmp_path, checkpoint):
    done = infer_cli(
        tmp_path / "ws", "--checkpoint", str(checkpoint), "--images", str(tiny_data / "aptos" / "test_images")
    )
    assert done.returncode == 0, done.stderr
    assert "8 predicted" in done.stdout


def test_a_missing_checkpoint_and_an_unknown_source_are_errors_in_words(
    tmp_path, checkpoint, monkeypatch, capsys
):
    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))  # in this process: no start-up
    assert infer.main(["--checkpoint", str(tmp_path / "nope.pth"), "--source", "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert infer.main(["--checkpoint", str(checkpoint), "--source", "nope"]) == 2
    assert "no source named 'nope'" in capsys.readouterr().err


def test_temperature_softens_the_probabilities(tiny_data, checkpoint):
    from engine.model.networks import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    samples = [Sample(str(p)) for p in sorted((tiny_data / "aptos" / "test_images").iterdir())]
    hot = predict(model, meta, samples, torch.device("cpu"), workers=0)
    cold = predict(model, {**meta, "temperature": 1.0}, samples, torch.device("cpu"), workers=0)
    assert (hot.grades == cold.grades).all()
    assert (hot.probs.max(1) < cold.probs.max(1)).all()
