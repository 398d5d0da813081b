"""K models on K folds by person: every labelled image trains the run's model and validates it."""

from collections import Counter

import numpy as np
import torch
from test_train import train_cli

from engine.data.datasets import Sample, folder_samples, person_folds, read_manifest, read_probabilities
from engine.model.networks import Ensemble, load_checkpoint, members_of
from engine.model.predictor import predict
from engine.training.trainer import Trainer

CPU = torch.device("cpu")


def test_folds_keep_each_person_whole_and_spread_every_grade():
    samples = [Sample(f"/x/{n}.png", n % 4, str(n), group=f"p{n // 2}") for n in range(90)]
    samples += [Sample(f"/y/{n}.png", 3, f"y{n}") for n in range(6)]  # no person known
    fold_of = person_folds(samples, 3, seed=0)
    assert person_folds(samples, 3, seed=0) == fold_of != person_folds(samples, 3, seed=1)
    by_person: dict[str, set[int]] = {}
    for sample, fold in zip(samples, fold_of, strict=True):
        by_person.setdefault(sample.group or sample.path, set()).add(fold)
    assert all(len(folds) == 1 for folds in by_person.values())
    for grade in range(4):  # a person counts under their highest grade: 2 images at most
        counts = Counter(f for s, f in zip(samples, fold_of, strict=True) if max(s.grade, 0) == grade)
        assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 2


def probs_of(model: torch.nn.Module, meta: dict, samples: list[Sample]) -> np.ndarray:
    result = predict(model, meta, samples, CPU, tta=meta["train_config"]["tta"], workers=0)
    assert len(result.indices) == len(samples)
    return result.probs


def test_each_image_is_judged_by_the_model_that_did_not_learn_it_and_the_run_averages_them(
    tiny_data, tmp_path
):
    images = folder_samples(tiny_data / "validation")
    done = train_cli(
        tmp_path, "--data-path", str(tiny_data / "validation"), "--epochs", "1", "--folds", "3", "--name", "k"
    )
    run = tmp_path / "weights" / "k"
    model, meta = load_checkpoint(run / "best.pth")
    assert isinstance(model, Ensemble) and meta["members"] == 3 and sum(meta["train_counts"]) == len(images)
    held_out = []
    for i, member in enumerate(members_of(model), 1):
        learned, judged = read_manifest(run / f"fold-{i}" / "samples.csv")
        assert {s.path for s in learned}.isdisjoint(s.path for s in judged)
        assert {s.path for s in learned} | {s.path for s in judged} == {s.path for s in images}
        held_out.append((member, judged))
    assert sorted(s.path for _, judged in held_out for s in judged) == sorted(s.path for s in images)
    # validation.csv: every image once, as the model that did not learn it grades it with the
    # run's temperature
    stored_samples, stored = read_probabilities(run / "validation.csv")
    stored_by_path = dict(zip((s.path for s in stored_samples), stored, strict=True))
    assert len(stored_by_path) == len(images)
    for member, judged in held_out:
        expected = probs_of(member, meta, judged)
        assert np.abs(np.array([stored_by_path[s.path] for s in judged]) - expected).max() < 1e-4
    # the run's model: the mean of its members' calibrated probabilities at T = 1
    plain = {**meta, "temperature": 1.0}
    averaged = np.mean([probs_of(member, plain, images) for member in members_of(model)], 0)
    assert np.abs(probs_of(model, plain, images) - averaged).max() < 1e-5
    assert 0 <= meta["calibration"]["screening"]["threshold"] <= 1
    assert done.stderr.index("model 1 of 3") < done.stderr.index("model 3 of 3")


def test_folds_on_the_training_split_are_scored_on_validation(tiny_data, tmp_path):
    """--refit false: the models learn the training split, the Ensemble is scored on the rest."""
    screen = ["--folds", "2", "--refit", "false", "--name", "screen"]
    train_cli(tmp_path, "--data-path", str(tiny_data / "validation"), "--epochs", "1", *screen)
    run = tmp_path / "weights" / "screen"
    learned = read_manifest(run / "fold-1" / "samples.csv")
    val_samples, stored = read_probabilities(run / "validation.csv")
    trained = {s.path for part in learned for s in part}
    assert val_samples and trained.isdisjoint(s.path for s in val_samples)
    model, meta = load_checkpoint(run / "best.pth")
    assert np.abs(probs_of(model, meta, val_samples) - stored).max() < 1e-4


def test_a_run_by_folds_resumes_each_model_where_it_stopped(tiny_data, tmp_path):
    data = ["--data-path", str(tiny_data / "validation"), "--folds", "2", "--name", "r"]
    train_cli(tmp_path, *data, "--epochs", "1")
    run = tmp_path / "weights" / "r"
    learned, judged = read_manifest(run / "samples.csv")
    assert len(learned) == len(folder_samples(tiny_data / "validation")) and judged == []
    done = train_cli(tmp_path, *data, "--epochs", "2", "--resume")
    assert "epoch 1:" not in done.stderr
    assert [done.stderr.count(f"{model}, epoch 2:") for model in ("model 1", "model 2", "out of fold")] == [
        1,
        1,
        1,
    ]
    model, meta = load_checkpoint(run / "best.pth")
    assert isinstance(model, Ensemble) and meta["epoch"] == 2 and meta["train_config"]["epochs"] == 2


def test_a_budget_gives_each_model_the_epochs_one_model_on_every_image_would_train(
    tiny_data, tmp_path, monkeypatch
):
    timed = []

    def epochs_in_budget(trainer: Trainer, minutes: float) -> int:
        timed.append((len(trainer.train_samples), len(trainer.val_samples), minutes))
        return 2

    monkeypatch.setattr(Trainer, "epochs_in_budget", epochs_in_budget)
    data = ["--data-path", str(tiny_data / "validation"), "--folds", "2", "--name", "b"]
    done = train_cli(tmp_path, *data, "--minutes", "7")
    assert timed == [(len(folder_samples(tiny_data / "validation")), 0, 7.0)]  # timed once, as for a refit
    assert [done.stderr.count(f"model {i}, epoch 2:") for i in (1, 2)] == [1, 1]
