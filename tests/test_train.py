"""Training on tiny data with the tiny timm model: outputs, resume, freezing, database mode."""

import io
import json
import os
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from conftest import ROOT, TINY_TRAIN, write_image
from safetensors.torch import save_file
from sqlalchemy import select
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from db.schema import Epoch, Run
from db.session import migrate, session_scope
from db.users import LOCAL
from engine.data.datasets import Sample, augmentation, folder_samples, read_manifest, stratified_split
from engine.data.sources import import_source
from engine.model.networks import WeightsMismatch, create_model, load_checkpoint
from engine.runtime.workspace import Workspace
from engine.training.train import boolean, make_config, parse_args, refuse_existing_run, run_name_problem
from engine.training.train import main as train_main
from engine.training.trainer import (
    Hooks,
    NonFiniteLoss,
    NoTrainingImages,
    RunPaths,
    Trainer,
    epochs_for_budget,
    lr_at,
    soft_targets,
    stage_of,
)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def train_cli(workspace: Path, *args: str, returncode: int = 0) -> Ran:
    """The command `python -m engine.training.train` with the tiny model's options, run in this
    process (starting a process costs 5-8 s of imports)."""
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.dict(os.environ, {"DR_WORKSPACE": str(workspace)}),
        redirect_stdout(out),
        redirect_stderr(err),
    ):
        code = train_main([*TINY_TRAIN, *args])
    assert code == returncode, err.getvalue()[-3000:]
    return Ran(code, out.getvalue(), err.getvalue())


def test_cli_writes_checkpoints_tensorboard_and_estimate_info(tiny_data, tmp_path):
    done = train_cli(tmp_path, "--data-path", str(tiny_data / "validation"), "--epochs", "2", "--name", "t1")
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

    # The validation phase's curves, then the final model's training on every image.
    events = EventAccumulator(str(tmp_path / "runs" / "t1" / "validation")).Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {"train_loss", "train_acc", "val_loss", "val_acc", "learning_rate", "val_qwk"}
    assert [e.step for e in events.Scalars("val_qwk")] == [1, 2]
    events = EventAccumulator(str(tmp_path / "runs" / "t1")).Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "train_acc", "learning_rate"}

    report = (tmp_path / "estimate_info" / "t1.txt").read_text().splitlines()
    assert report[0] == "[epoch(train): 1 ]"
    assert report[1].startswith("precision: ") and len(report[1].split(", ")) == 4
    assert report[2].startswith("recall: ")
    assert "[epoch(valid): 2 ]" in report
    errors = [line for line in report if line.startswith("path: ")]
    for line in errors:
        path, true, pred = line.removeprefix("path: ").split("    ")
        assert path.split("/")[0] == true and true != pred

    # A new run with t1's settings from its config.json; an option beside it overrides.
    first = tmp_path / "weights" / "t1" / "config.json"
    train_cli(
        tmp_path,
        "--data-path",
        str(tiny_data / "validation"),
        "--config",
        str(first),
        "--lr",
        "0.02",
        "--name",
        "t2",
    )
    settings, repeated = (
        json.loads(p.read_text()) for p in (first, first.parent.parent / "t2" / "config.json")
    )
    assert repeated == {**settings, "lr": 0.02} and settings["lr"] != 0.02


def test_a_config_that_is_no_runs_config_is_an_error_in_words(tmp_path, capsys):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    for path, words in (
        (tmp_path / "nope.json", "No such file"),
        (tmp_path / "other.json", "not a run's config.json"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--from-db", "--config", str(path)])
        error = capsys.readouterr().err
        assert f"--config {path}: " in error and words in error


def test_the_final_model_learns_from_every_image(tiny_data, tmp_path):
    """The validation phase learns from the training split and calibrates on the rest; the
    run's model learns from both, for the same epochs, and carries that calibration."""
    done = train_cli(tmp_path, "--data-path", str(tiny_data / "validation"), "--epochs", "2", "--name", "all")
    images = folder_samples(tiny_data / "validation")
    run = tmp_path / "weights" / "all"
    train, val = read_manifest(run / "validation" / "samples.csv")
    assert train and val and {s.path for s in train} | {s.path for s in val} == {s.path for s in images}
    learned, judged = read_manifest(run / "samples.csv")
    assert sorted(s.path for s in learned) == sorted(s.path for s in images) and judged == []
    _, final = load_checkpoint(run / "best.pth")
    _, checked = load_checkpoint(run / "validation" / "best.pth")
    assert sum(final["train_counts"]) == len(images) > sum(checked["train_counts"]) == len(train)
    assert final["epoch"] == checked["epoch"] == 2
    assert final["temperature"] == checked["temperature"] and final["calibration"] == checked["calibration"]
    screening = final["calibration"]["screening"]
    assert 0 <= screening["threshold"] <= 1 and screening["target_sensitivity"] == 0.87
    assert (run / "validation" / "validation.csv").is_file()
    assert done.stderr.index("validation phase") < done.stderr.index("final model")
    # false: the validated model is the run's model, as before
    train_cli(
        tmp_path,
        "--data-path",
        str(tiny_data / "validation"),
        "--epochs",
        "1",
        "--name",
        "one",
        "--refit",
        "false",
    )
    _, meta = load_checkpoint(tmp_path / "weights" / "one" / "best.pth")
    assert sum(meta["train_counts"]) == len(train)
    assert not (tmp_path / "weights" / "one" / "validation").exists()


def test_resume_continues_the_epoch_count(tiny_data, tmp_path):
    data = ["--data-path", str(tiny_data / "validation"), "--name", "r"]
    train_cli(tmp_path, *data, "--epochs", "1")
    last = (tmp_path / "weights" / "r" / "last.pth").read_bytes()
    again = train_cli(tmp_path, *data, "--epochs", "1", returncode=2)  # not without --resume
    assert "a run named r exists already; choose another --name, or add --resume" in again.stderr
    assert (tmp_path / "weights" / "r" / "last.pth").read_bytes() == last  # untouched
    done = train_cli(tmp_path, *data, "--epochs", "2", "--resume")
    assert "epoch 1:" not in done.stderr and "epoch 2:" in done.stderr
    _, meta = load_checkpoint(tmp_path / "weights" / "r" / "last.pth")
    assert meta["epoch"] == 2
    report = (tmp_path / "estimate_info" / "r.txt").read_text()
    assert report.count("[epoch(valid): 1 ]") == 1 and report.count("[epoch(valid): 2 ]") == 1


@pytest.mark.parametrize("text", ["false", "False", "0", "no"])
def test_false_spellings_do_not_freeze(text):
    assert boolean(text) is False
    args = parse_args(["--data-path", "x", "--freeze-layers", text, *TINY_TRAIN])
    assert make_config(args).freeze_layers is False


def test_freeze_layers_trains_only_the_classifier(tiny_data, tmp_path):
    args = parse_args(["--data-path", "x", "--freeze-layers", "true", "--epochs", "1", *TINY_TRAIN])
    config = make_config(args)
    assert config.freeze_layers is True
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(config, train, val, RunPaths.under(Workspace(tmp_path), "f"), None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    changed = {
        k
        for k, v in trainer.model.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    }
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
        assert run.best_qwk == epochs[-1].qwk  # best.pth keeps the last epoch by default
        assert len(epochs[0].confusion) == 4 and len(epochs[0].recall) == 4
        assert sum(run.config["train_counts"]) == 24
    assert f"val QWK {run.best_qwk:.4f}" in done.stdout
    card = Path(run.checkpoint).parent / "MODEL_CARD.md"  # beside best.pth, said where
    assert f"INFO model card: {card}" in done.stderr
    assert card.read_text().startswith(f"# Model card: db1\n\nRun {run.id} of the DR grading app")


def tiny_config(**changes):
    args = parse_args(["--data-path", "x", "--epochs", "1", *TINY_TRAIN])
    config = make_config(args)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE"])
def test_a_run_name_that_leads_out_of_the_workspace_is_refused_before_anything_is_written(
    tiny_data, tmp_path, name, monkeypatch, capsys
):
    name = str(tmp_path / "absolute") if name == "ABSOLUTE" else name
    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))
    with pytest.raises(SystemExit) as stopped:  # in this process: a refusal needs no other
        train_main(
            [
                *TINY_TRAIN,
                "--data-path",
                str(tiny_data / "validation"),
                "--epochs",
                "1",
                "--refit",
                "false",
                "--name",
                name,
            ]
        )
    assert stopped.value.code == 2
    assert f"argument --name: run name {name!r}: use letters" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no checkpoint, TensorBoard run or report; no workspace


def test_a_run_name_is_a_folder_name_of_the_workspace():
    for name in ("t1", "seed-20240101-120000", "run_2.b", "_x", "café", "r" * 100):
        assert run_name_problem(name) is None, name
    for name in ("", ".", "..", "../x", "a/b", "/abs", ".hidden", "-x", "a b", "x\n", "a\\b", "r" * 101):
        assert run_name_problem(name).startswith(f"run name {name!r}: use letters"), name


def test_a_run_recorded_in_the_database_is_not_written_over(tmp_path):
    workspace = Workspace(tmp_path)
    migrate(workspace.db_url)
    refuse_existing_run(workspace.db_url, RunPaths.under(workspace, "db1"))  # a new name
    with session_scope(workspace.db_url) as session:  # e.g. its weights folder was moved away
        session.add(Run(name="db1", model_name="test_efficientnet", img_size=64))
    with pytest.raises(FileExistsError, match="a run named db1 exists already"):
        refuse_existing_run(workspace.db_url, RunPaths.under(workspace, "db1"))


def test_a_non_finite_loss_stops_the_run(tiny_data, tmp_path):
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(
        tiny_config(lr=1e30, warmup_epochs=0), train, val, RunPaths.under(Workspace(tmp_path), "nan"), None
    )
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
    result = Trainer(
        tiny_config(), train, val, RunPaths.under(Workspace(tmp_path), "s"), None, Record()
    ).fit()
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
    sizes, magnitudes, dropouts = zip(*stages, strict=True)
    assert sizes[0] == 128 and sizes[-1] == 256 and list(sizes) == sorted(sizes)
    assert magnitudes[0] == 5 and magnitudes[-1] == 10 and dropouts[0] < dropouts[-1]
    assert stage_of(tiny_config(progressive=False), 0)[:2] == (64, 0)
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(
        tiny_config(epochs=4, img_size=64, eval_size=64, progressive=True),
        train,
        val,
        RunPaths.under(Workspace(tmp_path), "p"),
        None,
    )
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
    promote(workspace.db_url, ids["second"], LOCAL)
    assert active_run_id(workspace.db_url) == ids["second"]


# --- training does what it says -------------------------------------------------------------


def loader_order(trainer, epoch: int) -> list[int]:
    loader = trainer._loader(trainer.train_samples, True, 64, 0, epoch)
    return [i for _, _, indices, _ in loader for i in indices.tolist()]


@pytest.mark.parametrize("balance", ["loss", "sampler"])
def test_every_epoch_draws_a_new_order_and_the_same_seed_the_same(tiny_data, tmp_path, balance):
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(
        tiny_config(balance=balance), train, val, RunPaths.under(Workspace(tmp_path), "o"), None
    )
    orders = [loader_order(trainer, epoch) for epoch in range(3)]
    assert orders[0] != orders[1] != orders[2]
    assert loader_order(trainer, 1) == orders[1]


def test_the_seed_fixes_the_new_head_so_that_a_run_repeats(tmp_path):
    def head(seed: int) -> torch.Tensor:
        trainer = Trainer(tiny_config(seed=seed), [], [], RunPaths.under(Workspace(tmp_path), "h"), None)
        return trainer.model.get_classifier().weight.detach().clone()

    assert torch.equal(head(3), head(3))
    assert not torch.equal(head(3), head(4))


def test_progressive_learning_ends_at_the_train_size():
    config = tiny_config(epochs=8, img_size=300, eval_size=384, progressive=True)
    assert stage_of(config, 7)[0] == 300 and stage_of(config, 0)[0] == 128


def test_the_train_loss_is_plain_cross_entropy_like_the_validation_loss(tiny_data, tmp_path):
    """The class weights steer the gradient only: with the weights steering nothing (lr ~ 0),
    a weighted and an unweighted run record the same train loss."""
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    train = [s for s in train if s.grade != 3] + [s for s in train if s.grade == 3][:1]
    losses = []
    for balance in ("loss", "none"):
        config = tiny_config(balance=balance, lr=1e-12, drop_rate=0.0)
        trainer = Trainer(config, train, val, RunPaths.under(Workspace(tmp_path), balance), None)
        losses.append(trainer.fit().epochs[0]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_an_epoch_without_one_readable_image_stops_in_words(tiny_data, tmp_path):
    _, val = stratified_split(folder_samples(tiny_data / "validation"))
    broken = [tmp_path / f"broken{n}.png" for n in range(3)]
    for path in broken:
        path.write_text("no pixels here")
    trainer = Trainer(
        tiny_config(),
        [Sample(str(p), 1, p.stem) for p in broken],
        val,
        RunPaths.under(Workspace(tmp_path), "b"),
        None,
    )
    with pytest.raises(NoTrainingImages, match="none of the 3 training images could be read"):
        trainer.fit()


def test_class_folders_too_few_to_split_are_an_error_in_words(tmp_path, monkeypatch):
    write_image(tmp_path / "folders" / "0" / "only.png")
    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))
    # SystemExit with a message: the terminal shows it alone, no traceback, and status 1.
    with pytest.raises(SystemExit, match="1 images are too few to split 80/20"):
        train_main([*TINY_TRAIN, "--data-path", str(tmp_path / "folders"), "--epochs", "1"])


def test_a_weight_file_of_another_model_is_an_error_naming_the_first_mismatch(
    tiny_data, tmp_path, monkeypatch, capsys
):
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet18", num_classes=4).state_dict(), other)
    with pytest.raises(WeightsMismatch, match="does not fit test_efficientnet: .* first "):
        create_model("test_efficientnet", pretrained=other)
    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path))
    assert (
        train_main(
            [
                *TINY_TRAIN[:4],
                "--weights",
                str(other),
                "--data-path",
                str(tiny_data / "validation"),
                "--epochs",
                "1",
            ]
        )
        == 2
    )
    assert "does not fit test_efficientnet" in capsys.readouterr().err


def test_a_fitting_weight_file_is_loaded_whole_but_a_classifier_of_another_size(tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=10)
    path = tmp_path / "test_efficientnet.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = create_model("test_efficientnet", pretrained=path)
    for key, value in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert model.get_classifier().out_features == 4


def test_a_model_named_by_option_or_by_its_weight_file_gets_its_own_sizes():
    def sizes(*options: str) -> tuple[int, int]:
        config = make_config(parse_args(["--data-path", "x", "--device", "cpu", *options]))
        return config.img_size, config.eval_size

    assert sizes("--model", "tf_efficientnetv2_s") == (300, 384)
    assert sizes("--model", "tf_efficientnet_lite2") == (260, 260)
    assert sizes("--weights", "weights/tf_efficientnetv2_m.safetensors") == (384, 480)
    assert sizes("--model", "tf_efficientnetv2_s", "--img-size", "256") == (256, 328)
    assert sizes("--model", "tf_efficientnet_lite0", "--img-size", "320") == (320, 320)


def test_a_run_records_its_images_and_resume_continues_on_them(tiny_data, tmp_path):
    data = ["--data-path", str(tiny_data / "validation"), "--name", "m"]
    train_cli(tmp_path, *data, "--epochs", "1", "--lr", "0.02")
    manifest = tmp_path / "weights" / "m" / "samples.csv"
    train, val = read_manifest(manifest)
    assert len(train) + len(val) == len(folder_samples(tiny_data / "validation"))
    assert {s.grade for s in train} == {0, 1, 2, 3}
    # Resumed with other options, the run keeps its own config and images.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    train_cli(tmp_path, "--data-path", str(empty), "--name", "m", "--resume", "--lr", "0.5", "--epochs", "2")
    config = json.loads((tmp_path / "weights" / "m" / "config.json").read_text())
    assert config["lr"] == 0.02
    assert read_manifest(manifest) == (train, val)
    _, meta = load_checkpoint(tmp_path / "weights" / "m" / "last.pth")
    assert meta["epoch"] == 2


def test_a_budget_of_minutes_sets_the_epochs(tiny_data, tmp_path):
    train, val = stratified_split(folder_samples(tiny_data / "validation"))
    trainer = Trainer(tiny_config(), train, val, RunPaths.under(Workspace(tmp_path), "t"), tmp_path / "cache")
    small, large = trainer.epochs_in_budget(0.001), trainer.epochs_in_budget(5)
    assert small == 1 and large > 10
    assert epochs_for_budget(10, 60, 90) == 6


def readme_commands(marker: str) -> list[list[str]]:
    """The `engine.training.train` commands of the README that follow a comment line containing
    `marker`, as argument lists."""
    lines = (ROOT / "README.md").read_text().replace("\\\n", " ").splitlines()
    return [
        shlex.split(line)[1:]
        for before, line in pairwise(lines)
        if marker in before and "-m engine.training.train" in line
    ]


def test_the_readmes_seed_commands_run_on_a_cpu(tiny_data, tmp_path):
    """As printed, but for the data folder, a single epoch and 96 px images (the model's
    own sizes train the same code, minutes slower); the V2-S weight file is a random one of
    the right shape, since none can be downloaded here."""
    commands = readme_commands("The seed's command") + readme_commands("seed's EfficientNetV2-S")
    assert len(commands) == 2
    weights = tmp_path / "weights" / "tf_efficientnetv2_s.safetensors"
    weights.parent.mkdir()
    save_file(timm.create_model("tf_efficientnetv2_s").state_dict(), weights)
    for n, command in enumerate(commands):
        command = [str(tiny_data / "validation") if a == "/data/folders" else a for a in command]
        command[command.index("--epochs") + 1] = "1"
        done = subprocess.run(
            [sys.executable, *command, "--name", f"seed{n}", "--img-size", "96"],
            cwd=tmp_path,
            env={
                "PATH": "/usr/bin:/bin",
                "DR_WORKSPACE": str(tmp_path / "ws"),
                "PYTHONPATH": str(ROOT),
                "HF_HUB_OFFLINE": "1",
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        _, meta = load_checkpoint(tmp_path / "ws" / "weights" / f"seed{n}" / "best.pth")
        assert meta["model_name"] == (
            "tf_efficientnetv2_s" if "--weights" in command else "tf_efficientnet_lite0"
        )


def test_ordinal_targets_put_more_weight_on_near_grades():
    targets = soft_targets(torch.tensor([1, 3]), 4)
    assert torch.allclose(targets.sum(1), torch.ones(2))
    assert targets[0].argmax() == 1 and targets[0, 0] == targets[0, 2] > targets[0, 3]
    assert targets[1, 2] > targets[1, 1] > targets[1, 0]


def test_light_augmentation_turns_and_mirrors_only():
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    views = {augmentation(8, 0, "light")(image).numpy().tobytes() for _ in range(200)}
    symmetries = {
        torch.rot90(flipped, k, (-2, -1)).numpy().tobytes()
        for flipped in (image, image.flip(-1))
        for k in range(4)
    }
    assert views == symmetries
