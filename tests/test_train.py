"""Training on tiny data with the tiny timm model: outputs, resume, freezing, database mode."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT
from db.schema import Epoch, Run
from db.session import migrate, session_scope
from engine.data import Sample, folder_samples, stratified_split
from engine.models import load_checkpoint
from engine.sources import import_source
from engine.train import boolean, make_config, parse_args
from engine.trainer import Hooks, NonFiniteLoss, RunPaths, Trainer, lr_at, stage_of
from engine.workspace import Workspace

TINY = ["--model", "test_efficientnet", "--img-size", "64", "--pretrained", "false",
        "--batch-size", "8", "--workers", "0", "--lr", "0.05"]


def train_cli(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(workspace), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "engine.train", *TINY, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_writes_checkpoints_tensorboard_and_estimate_info(tiny_data, tmp_path):
    done = train_cli(tmp_path, "--data-path", str(tiny_data / "validation"), "--epochs", "2",
                     "--name", "t1")
    last_line = done.stdout.strip().splitlines()[-1]
    best = tmp_path / "weights" / "t1" / "best.pth"
    assert last_line.startswith(f"best checkpoint: {best}  val QWK ")
    float(last_line.rsplit(" ", 1)[1])

    model, meta = load_checkpoint(best)
    assert meta["model_name"] == "test_efficientnet" and meta["image_size"] == 64
    assert meta["classes"] == [0, 1, 2, 3] and meta["preprocess"]["size"] == 64
    assert meta["temperature"] > 0 and "ece_after" in meta["calibration"]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert (tmp_path / "weights" / "t1" / "last.pth").is_file()

    events = EventAccumulator(str(tmp_path / "runs" / "t1")).Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train_loss", "train_acc", "val_loss", "val_acc", "learning_rate", "val_qwk"}
    assert [e.step for e in events.Scalars("val_qwk")] == [1, 2]

    report = (tmp_path / "estimate_info" / "t1.txt").read_text().splitlines()
    assert report[0] == "[epoch(train): 1 ]"
    assert report[1].startswith("precision: ") and len(report[1].split(", ")) == 4
    assert report[2].startswith("recall: ")
    assert "[epoch(valid): 2 ]" in report
    errors = [line for line in report if line.startswith("path: ")]
    for line in errors:
        path, true, pred = line.removeprefix("path: ").split("    ")
        assert path.split("/")[0] == true and true != pred


def test_resume_continues_the_epoch_count(tiny_data, tmp_path):
    data = ["--data-path", str(tiny_data / "validation"), "--name", "r"]
    train_cli(tmp_path, *data, "--epochs", "1")
    done = train_cli(tmp_path, *data, "--epochs", "2", "--resume")
    assert "epoch 1:" not in done.stdout and "epoch 2:" in done.stdout
    _, meta = load_checkpoint(tmp_path / "weights" / "r" / "last.pth")
    assert meta["epoch"] == 2
    report = (tmp_path / "estimate_info" / "r.txt").read_text()
    assert report.count("[epoch(valid): 1 ]") == 1 and report.count("[epoch(valid): 2 ]") == 1


@pytest.mark.parametrize("text", ["false", "False", "0", "no"])
def test_false_spellings_do_not_freeze(text):
    assert boolean(text) is False
    args = parse_args(["--data-path", "x", "--freeze-layers", text, *TINY])
    assert make_config(args).freeze_layers is False


def test_freeze_layers_trains_only_the_classifier(tiny_data, tmp_path):
    args = parse_args(["--data-path", "x", "--freeze-layers", "true", "--epochs", "1", *TINY])
    config = make_config(args)
    assert config.freeze_layers is True
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(config, train, val, RunPaths.under(Workspace(tmp_path), "f"), None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    changed = {k for k, v in trainer.model.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])}
    weights_changed = {k for k in changed if "running" not in k}
    assert weights_changed == {"classifier.weight", "classifier.bias"}


def test_stratified_split_keeps_every_grade(tiny_data):
    samples = folder_samples(tiny_data / "validation")
    train, val = stratified_split(samples, 0.25, seed=0)
    assert len(train) + len(val) == len(samples) and not {s.path for s in train} & {s.path for s in val}
    assert {s.grade for s in val} == {0, 1, 2, 3}
    assert stratified_split(samples, 0.25, seed=0) == (train, val)


def test_database_mode_records_the_run_and_its_epochs(tiny_data, tmp_path):
    workspace = Workspace(tmp_path)
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train")
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation")
    done = train_cli(tmp_path, "--from-db", "--epochs", "2", "--name", "db1")
    with session_scope(workspace.db_url) as session:
        run = session.scalar(select(Run).where(Run.name == "db1"))
        epochs = session.scalars(select(Epoch).where(Epoch.run_id == run.id)).all()
        assert run.status == "done" and Path(run.checkpoint).is_file()
        assert [e.epoch for e in epochs] == [1, 2]
        assert run.best_qwk == max(e.qwk for e in epochs)
        assert len(epochs[0].confusion) == 4 and len(epochs[0].recall) == 4
        assert sum(run.config["train_counts"]) == 24
    assert f"val QWK {run.best_qwk:.4f}" in done.stdout


def tiny_config(**changes):
    args = parse_args(["--data-path", "x", "--epochs", "1", *TINY])
    config = make_config(args)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_a_non_finite_loss_stops_the_run(tiny_data, tmp_path):
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(tiny_config(lr=1e30, warmup_epochs=0), train, val,
                      RunPaths.under(Workspace(tmp_path), "nan"), None)
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        trainer.fit()


def test_an_unreadable_training_image_is_skipped(tiny_data, tmp_path):
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    broken = tmp_path / "broken.png"
    broken.write_text("no pixels here")
    skipped = []

    class Record(Hooks):
        def on_skipped(self, reasons):
            skipped.extend(reasons)

    train.append(Sample(str(broken), 1, "broken"))
    result = Trainer(tiny_config(), train, val, RunPaths.under(Workspace(tmp_path), "s"), None, Record()).fit()
    assert len(result.epochs) == 1 and skipped and str(broken) in skipped[0]


def test_schedule_warms_up_then_follows_the_cosine_down_to_lr_times_lrf():
    config = tiny_config(epochs=10, lr=0.1, lrf=0.01, warmup_epochs=1.0)
    warm = [lr_at(config, p) for p in (0.0, 0.5, 0.99)]
    assert warm == sorted(warm) and warm[-1] < 0.1
    assert lr_at(config, 1.0) == pytest.approx(0.1)
    after = [lr_at(config, e) for e in range(1, 11)]
    assert after == sorted(after, reverse=True)
    assert lr_at(config, 10) == pytest.approx(0.001)


def test_progressive_learning_grows_size_and_regularisation(tiny_data, tmp_path):
    config = tiny_config(epochs=8, img_size=256, eval_size=256, progressive=True)
    stages = [stage_of(config, epoch) for epoch in range(8)]
    sizes, magnitudes, dropouts = zip(*stages)
    assert sizes[0] == 128 and sizes[-1] == 256 and list(sizes) == sorted(sizes)
    assert magnitudes[0] == 5 and magnitudes[-1] == 10 and dropouts[0] < dropouts[-1]
    assert stage_of(tiny_config(progressive=False), 0)[:2] == (64, 0)
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(tiny_config(epochs=4, img_size=64, eval_size=64, progressive=True),
                      train, val, RunPaths.under(Workspace(tmp_path), "p"), None)
    assert [record["img_size"] for record in trainer.fit().epochs] == [32, 32, 64, 64]


def test_the_first_finished_run_becomes_active_and_later_ones_wait(tiny_data, tmp_path):
    from db.runs import active_run_id, promote
    workspace = Workspace(tmp_path)
    migrate(workspace.db_url)
    import_source(workspace.db_url, "aptos", tiny_data / "aptos", "train")
    import_source(workspace.db_url, "folders", tiny_data / "validation", "validation")
    train_cli(tmp_path, "--from-db", "--epochs", "1", "--name", "first")
    train_cli(tmp_path, "--from-db", "--epochs", "1", "--name", "second")
    with session_scope(workspace.db_url) as session:
        ids = dict(session.execute(select(Run.name, Run.id)).all())
    assert active_run_id(workspace.db_url) == ids["first"]
    promote(workspace.db_url, ids["second"])
    assert active_run_id(workspace.db_url) == ids["second"]
