"""Training on two processes under torchrun (DistributedDataParallel, gloo on this CPU): a job
that runs as one, cancels as one and resumes; its loss curve is the one-process curve of the
same global batch; its checkpoint serves the one-process predictor.

The curves are compared on test_efficientnet_gn, timm's test_efficientnet with GroupNorm for
BatchNorm: it normalises each image by itself, so two ranks of 4 images compute exactly what
one process of 8 does, and the curves agree to float rounding (TOLERANCE). With BatchNorm each
rank normalises by its own 4 images: measured on this data, the train loss of test_efficientnet
parts by 1 % at epoch 1 and up to 47 % by epoch 2, which no useful tolerance covers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, wait_for_job
from sqlalchemy import select
from torch.utils.data import WeightedRandomSampler

from db.schema import Epoch, Job, Run
from db.session import migrate, session_scope
from db.users import LOCAL
from engine.data.datasets import RankShare, Sample, class_weights, folder_samples
from engine.data.sources import import_source
from engine.loop.retrain import default_settings, settings_problem
from engine.model.networks import load_checkpoint
from engine.model.predictor import predict
from engine.runtime import jobs
from engine.runtime.workspace import Workspace
from engine.training import train
from engine.training.trainer import RunPaths, TrainConfig, Trainer, soft_targets

# Every step the same for one process and for two: no augmentation, no dropout, a constant
# learning rate (so that a run resumed with another epoch count keeps its schedule).
RECIPE = [
    "--from-db",
    "--model",
    "test_efficientnet_gn",
    "--img-size",
    "64",
    "--pretrained",
    "false",
    "--workers",
    "0",
    "--optimizer",
    "sgd",
    "--lr",
    "0.01",
    "--lrf",
    "1",
    "--warmup-epochs",
    "0",
    "--balance",
    "sampler",
    "--loss",
    "ce",
    "--augment",
    "none",
    "--drop-rate",
    "0",
    "--tta",
    "false",
    "--bf16",
    "false",
    "--freeze-stages",
    "0",
    "--batch-size",
    "8",
    "--refit",
    "false",
]
TOLERANCE = 1e-3  # relative: float sums in another order


def torchrun(workspace: Workspace, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace.root), "HF_HUB_OFFLINE": "1"}
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "engine.training.train",
        *RECIPE,
        *args,
    ]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def history(workspace: Workspace, name: str) -> list[dict]:
    return torch.load(workspace.weights / name / "resume.pt", weights_only=True)["history"]


def epochs_recorded(workspace: Workspace, name: str) -> list[int]:
    with session_scope(workspace.db_url) as session:
        run_id = session.scalar(select(Run.id).where(Run.name == name))
        return list(session.scalars(select(Epoch.epoch).where(Epoch.run_id == run_id)))


def still_running(workspace: Workspace, job_id: int) -> list[int]:
    """Processes on this machine that belong to the job (torchrun and its workers); another
    test's job of the same number has another workspace."""
    mine = f"DR_WORKSPACE={workspace.root}".encode()
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and jobs._runs_here(int(p.name), job_id) and mine in environ(p)
    ]


def environ(process: Path) -> list[bytes]:
    try:
        return (process / "environ").read_bytes().split(b"\0")
    except OSError:  # ended meanwhile
        return []


def test_two_processes_train_as_one_cancel_as_one_and_resume(tiny_data, tmp_path, monkeypatch):
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train")  # 24 images
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation")

    # A job on two processes whose epochs come from a budget: rank 0 measures, both train
    # as many (ranks that disagreed would wait for each other forever). Cancelled after one.
    job_id = jobs.start_job(
        workspace,
        "train",
        "engine.training.train",
        [*RECIPE, "--minutes", "1", "--name", "ddp"],
        processes=2,
        user=LOCAL,
    )
    job = wait_for_job(
        workspace,
        job_id,
        lambda j: epochs_recorded(workspace, "ddp") or j.status not in jobs.ACTIVE,
        timeout=300,
    )
    jobs.cancel_job(workspace.db_url, job_id, user=LOCAL)
    job = wait_for_job(workspace, job_id, lambda j: j.status not in jobs.ACTIVE)
    log = jobs.log_tail(job.log_path, 200)
    assert job.status == "cancelled" and job.error is None, log
    jobs._children[(workspace.db_url, job_id)].wait(timeout=120)
    assert still_running(workspace, job_id) == []  # every rank has stopped
    with session_scope(workspace.db_url) as session:
        assert session.scalar(select(Run.status).where(Run.name == "ddp")) == "cancelled"
        assert len(session.scalars(select(Job)).all()) == 1  # one job, whatever the processes
    assert log.count(" epochs fit into 1 minutes") == 1, log  # rank 0 alone reports

    resumed = torchrun(workspace, "--resume", "--name", "ddp", "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 processes, 4 images each of a batch of 8" in resumed.stderr

    monkeypatch.setenv("DR_WORKSPACE", str(workspace.root))
    assert train.main([*RECIPE, "--epochs", "3", "--name", "one"]) == 0

    two, one = history(workspace, "ddp")[:3], history(workspace, "one")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=TOLERANCE), key

    # Rank 0 alone wrote: one database row and one report block per epoch, its own TensorBoard
    # file (one per launch).
    done = [r["epoch"] for r in history(workspace, "ddp")]
    assert epochs_recorded(workspace, "ddp") == done and done[:3] == [1, 2, 3]
    report = (workspace.estimate_info / "ddp.txt").read_text()
    assert [report.count(f"[epoch(valid): {e} ]") for e in done] == [1] * len(done)
    assert len(list((workspace.runs / "ddp").glob("events.out.tfevents.*"))) == 2

    # The checkpoint is a plain one: the one-process predictor grades as validation did.
    model, meta = load_checkpoint(workspace.weights / "ddp" / "best.pth")
    val = folder_samples(tiny_data / "validation")
    graded = predict(model, meta, val, torch.device("cpu"), workers=0)
    truth = [val[i].grade for i in graded.indices]
    assert len(graded.indices) == 16
    assert (graded.grades == truth).mean() == pytest.approx(meta["metrics"]["val_acc"])


def test_two_processes_validate_then_train_on_every_image(tiny_data, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train")  # 24 images
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation")  # 16
    done = torchrun(workspace, "--refit", "true", "--epochs", "1", "--name", "all")
    assert done.returncode == 0, done.stderr[-3000:]
    _, final = load_checkpoint(workspace.weights / "all" / "best.pth")
    _, checked = load_checkpoint(workspace.weights / "all" / "validation" / "best.pth")
    assert sum(final["train_counts"]) == 40 and sum(checked["train_counts"]) == 24
    assert final["calibration"] == checked["calibration"]
    assert epochs_recorded(workspace, "all") == [1]  # the validated epoch, once


@pytest.mark.parametrize("count", [24, 25])
def test_each_rank_takes_every_other_balanced_draw(count):
    grades = [0] * (count - 6) + [1, 2, 3] * 2
    samples = [Sample(f"{i}.png", g) for i, g in enumerate(grades)]
    weights = class_weights(samples)[grades]

    def draws(seed: int = 5) -> WeightedRandomSampler:
        return WeightedRandomSampler(weights, count, generator=torch.Generator().manual_seed(seed))

    alone = list(draws())
    shares = [list(RankShare(draws(), rank, 2)) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == len(RankShare(draws(), 0, 2)) == -(-count // 2)
    together = [i for pair in zip(*shares, strict=True) for i in pair]
    assert together[:count] == alone  # the ranks' batches together are the one-process batch
    assert together[count:] == alone[: len(together) - count]  # padded from the start
    assert list(RankShare(draws(), 0, 2)) == shares[0]  # the same seed, the same share


def test_the_form_asks_for_a_batch_that_splits_over_the_gpus():
    cpu = default_settings("cpu")
    assert cpu["processes"] == 1  # no torchrun without GPUs
    settings = {**cpu, "name": "x", "batch_size": 10}
    assert settings_problem(settings, set()) is None
    assert settings_problem({**settings, "processes": 4}, set()) == (
        "A batch of 10 does not split evenly over 4 GPUs: choose a multiple of 4."
    )


@pytest.mark.parametrize("loss", ["ce", "ordinal"])
def test_one_process_still_minimises_the_class_weighted_mean(tmp_path, loss):
    samples = [Sample(f"{i}.png", g) for i, g in enumerate([0] * 6 + [1, 2, 3, 3])]
    config = TrainConfig(
        model="test_efficientnet",
        img_size=64,
        eval_size=64,
        pretrained=False,
        balance="loss",
        loss=loss,
        workers=0,
    )
    trainer = Trainer(config, samples, samples, RunPaths.under(Workspace(tmp_path), "w"), None)
    logits, labels = torch.randn(5, 4), torch.tensor([0, 0, 1, 3, 2])
    targets = soft_targets(labels, 4) if loss == "ordinal" else labels
    expected = F.cross_entropy(logits, targets, weight=trainer.loss_weights)
    differentiated, value = trainer._loss(logits, labels)
    assert differentiated.item() == pytest.approx(expected.item(), rel=1e-6)
    assert value == pytest.approx(expected.item(), rel=1e-6)
