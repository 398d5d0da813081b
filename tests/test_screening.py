"""The operating point and the validation probabilities a run stores, and run differences
judged against their interval."""

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from engine.data.datasets import Sample, folder_samples, read_probabilities, stratified_split
from engine.model.metrics import operating_point, referable_score
from engine.model.networks import load_checkpoint
from engine.model.predictor import predict
from engine.runtime.workspace import Workspace
from engine.training.refit import train_model
from engine.training.screening import (
    choose_operating_point,
    paired_difference,
    repeated_difference,
    roc_points,
    validation_file,
)
from engine.training.train import make_config, parse_args
from engine.training.trainer import Hooks, RunPaths

TINY = [*TINY_TRAIN, "--epochs", "1"]  # one epoch is enough here


def people(count: int, seed: int) -> tuple[list[Sample], np.ndarray]:
    """`count` images of count / 2 people, with probabilities that mostly know the grade."""
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 4, count)
    samples = [Sample(f"/x/{n}.png", int(g), str(n), group=f"p{n // 2}") for n, g in enumerate(grades)]
    guessed = np.where(rng.random(count) < 0.7, grades, rng.integers(0, 4, count))
    return samples, np.eye(4)[guessed] * 0.6 + 0.1


def test_repeats_average_their_differences_and_their_disagreement_widens_the_interval():
    samples, probs = people(300, 1)
    truth = np.eye(4)[[s.grade for s in samples]] * 0.6 + 0.1
    better = paired_difference((samples, truth), (samples, probs))
    # Two repeats that agree: the same mean, an interval about as narrow.
    agree = repeated_difference([((samples, truth), (samples, probs))] * 2)
    assert agree["repeats"] == 2 and agree["images"] == 600
    assert agree["qwk"]["value"] == pytest.approx(better["qwk"]["value"]) and agree["qwk"]["beyond_noise"]
    # One repeat where the first model wins and one where it loses by as much: no difference
    # on average, and drawing the repeats puts 0 well inside the interval, though each
    # repeat alone is far beyond the noise of its images.
    split = repeated_difference([((samples, truth), (samples, probs)), ((samples, probs), (samples, truth))])
    assert split["qwk"]["value"] == pytest.approx(0, abs=1e-12)
    low, high = split["qwk"]["interval"]
    assert low < -0.5 * better["qwk"]["value"] and high > 0.5 * better["qwk"]["value"]
    assert not split["qwk"]["beyond_noise"] and not split["referable_auc"]["beyond_noise"]


def test_a_run_stores_what_inference_computes_and_a_point_chosen_on_it(tiny_data, tmp_path):
    """bfloat16 trains, but the validation probabilities (and so the temperature and the
    operating point) are those of float32 inference, as the Inference page computes them."""
    config = make_config(parse_args(["--data-path", "x", "--bf16", "true", "--refit", "false", *TINY]))
    train, val = stratified_split(folder_samples(tiny_data / "validation"), 0.5)
    paths = RunPaths.under(Workspace(tmp_path), "cal")
    result = train_model(config, train, val, paths, None, Hooks())
    stored_samples, stored = read_probabilities(validation_file(result.best_checkpoint))
    model, meta = load_checkpoint(result.best_checkpoint)
    inferred = predict(model, meta, stored_samples, torch.device("cpu"), tta=config.tta, workers=0)
    assert np.abs(inferred.probs - stored).max() < 1e-4
    screening = meta["calibration"]["screening"]
    positive = np.array([s.grade >= 2 for s in stored_samples])
    assert screening["threshold"] == pytest.approx(
        operating_point(positive, referable_score(stored), 0.87), abs=1e-5
    )
    # Another target, chosen later from the stored probabilities.
    strict = choose_operating_point(result.best_checkpoint, 0.5, screening["seed"])
    assert strict["threshold"] >= screening["threshold"]
    assert strict["target_sensitivity"] == 0.5


def test_roc_points_run_from_nothing_to_everything_flagged():
    samples, probs = people(60, 0)
    fpr, tpr = roc_points(samples, probs)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()


def test_a_run_against_itself_differs_by_nothing_and_a_better_one_by_more_than_noise():
    samples, probs = people(300, 1)
    same = paired_difference((samples, probs), (samples, probs.copy()))
    assert same["images"] == 300 and same["qwk"]["value"] == 0
    assert same["qwk"]["interval"] == [0, 0] and not same["qwk"]["beyond_noise"]
    truth = np.eye(4)[[s.grade for s in samples]] * 0.6 + 0.1
    better = paired_difference((samples, truth), (samples, probs))
    assert better["qwk"]["value"] > 0 and better["qwk"]["beyond_noise"]
    assert better["qwk"]["interval"][0] > 0
    # Only the images both were judged on count, matched by path whatever their order.
    half = paired_difference((samples[:150], truth[:150]), (samples[::-1], probs[::-1]))
    assert half["images"] == 150
    assert half["qwk"]["value"] == pytest.approx(
        paired_difference((samples[:150], truth[:150]), (samples[:150], probs[:150]))["qwk"]["value"]
    )
