"""The loop-gain measurement: queue orders, the simulated reviewer, and the command end to end
on tiny synthetic data with the tiny timm model."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint

from engine.data.datasets import Sample, shared_groups
from engine.data.synth import write_dataset
from engine.loop.loopgain import SimulatedReviewer, loop_split, main, reviewed, unreviewed
from engine.loop.queue_order import ORDERS, queue_order
from engine.model.networks import load_checkpoint
from engine.model.predictor import Predictions, predict

TINY = (
    "--model test_efficientnet --pretrained false --img-size 64 --batch-size 8 "
    "--workers 0 --lr 0.05 --bf16 false"
)

PROBS = np.array(
    [
        [0.70, 0.30, 0.00, 0.00],  # confidence 0.70, margin 0.40, cost 0.30
        [0.90, 0.00, 0.00, 0.10],  # confidence 0.90, margin 0.80, cost 0.90
        [0.00, 0.15, 0.80, 0.05],  # confidence 0.80, margin 0.65, cost 0.20
        [0.40, 0.35, 0.25, 0.00],  # confidence 0.40, margin 0.05, cost 1.35
    ]
)
# Expected grades of the image and of its mirror image: gaps 0.2, 0.0, 1.5, 0.6.
VIEWS = np.array(
    [
        [[0.8, 0.2, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0]],
        [[0.9, 0.0, 0.0, 0.1], [0.9, 0.0, 0.0, 0.1]],
        [[0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.5, 0.0]],
        [[0.4, 0.4, 0.2, 0.0], [0.1, 0.4, 0.5, 0.0]],
    ]
)


@pytest.fixture
def one_thread():
    """Tiny models run 5-20x faster on one thread than on two while another process
    keeps the machine's cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "order, expected",
    [
        ("confidence", [3, 0, 2, 1]),  # least confident first, as the Review page's default
        ("margin", [3, 0, 2, 1]),
        ("cost", [3, 1, 0, 2]),  # a 0 with 0.1 on grade 3 before a 0 with 0.3 on grade 1
        ("flip", [2, 3, 0, 1]),
    ],
)
def test_each_order_puts_first_what_it_says(order, expected):
    assert queue_order(order, PROBS, VIEWS).tolist() == expected


def test_random_order_is_a_fixed_shuffle_per_seed_and_ties_keep_their_places():
    probs = np.tile([0.25, 0.25, 0.25, 0.25], (50, 1))
    first = queue_order("random", probs, seed=1)
    assert sorted(first) == list(range(50)) and first.tolist() != list(range(50))
    assert queue_order("random", probs, seed=1).tolist() == first.tolist()
    assert queue_order("random", probs, seed=2).tolist() != first.tolist()
    assert queue_order("confidence", probs).tolist() == list(range(50))


def test_flip_order_needs_both_views_and_unknown_orders_are_named():
    with pytest.raises(ValueError, match="flip views"):
        queue_order("flip", PROBS, VIEWS[:, :1])
    with pytest.raises(ValueError, match="'entropy'.*" + ", ".join(ORDERS)):
        queue_order("entropy", PROBS)


def test_predictions_with_tta_keep_each_flip_view(tiny_data, tmp_path, one_thread):
    model, meta = load_checkpoint(tiny_checkpoint(tmp_path / "tiny.pth", temperature=2.0))
    samples = [Sample(str(p)) for p in sorted((tiny_data / "aptos" / "test_images").iterdir())]
    cpu = torch.device("cpu")
    both, image = (
        predict(model, meta, samples, cpu, workers=0, tta=True),
        predict(model, meta, samples, cpu, workers=0, tta=False),
    )
    assert both.views.shape == (len(samples), 2, 4) and image.views.shape == (len(samples), 1, 4)
    np.testing.assert_allclose(both.views[:, 0], image.probs, atol=1e-6)
    np.testing.assert_allclose(image.views[:, 0], image.probs, atol=1e-6)
    assert np.abs(both.views[:, 0] - both.views[:, 1]).max() > 1e-4
    # TTA averages the views' probabilities before the temperature (T = 2): the views are
    # softmax(l / 2), so squaring and normalising them gives softmax(l).
    square = both.views**2 / (both.views**2).sum(2, keepdims=True)
    mean = np.sqrt(square.mean(1))
    np.testing.assert_allclose(both.probs, mean / mean.sum(1, keepdims=True), atol=1e-5)
    eight = predict(model, meta, samples, cpu, workers=0, tta=8)
    assert eight.views.shape == (len(samples), 8, 4)
    np.testing.assert_allclose(eight.views[:, :2], both.views, atol=1e-6)


def test_a_round_takes_the_candidates_in_queue_order_up_to_the_budget():
    # Five pool images; the third could not be read, so the predictions skip it.
    pool = [Sample(f"/pool/{n}.png", grade, str(n)) for n, grade in enumerate([1, 0, 3, 2, 1])]
    preds = Predictions([0, 1, 3, 4], PROBS, views=VIEWS)
    reviewer = SimulatedReviewer(0.0)
    labels, decisions, found = reviewed("confidence", 2, reviewer, 0.5, 0)(pool, preds, 1)
    # At >= 0.5 the candidates are rows 0, 1, 2 (confidence 0.7, 0.9, 0.8): least confident
    # first, rows 0 and 2, i.e. pool images 0 and 3, graded with the truth.
    assert [(x.sample.name, x.grade, x.predicted) for x in labels] == [("0", 1, 0), ("3", 2, 2)]
    assert (decisions, found) == (2, 3)
    labels, decisions, found = unreviewed(0.5)(pool, preds, 1)
    assert [(x.sample.name, x.grade) for x in labels] == [("0", 0), ("1", 0), ("3", 2)]
    assert (decisions, found) == (0, 3)


@pytest.mark.parametrize("error_rate", [0.0, 0.2])
def test_the_simulated_reviewer_errs_at_the_error_rate(error_rate):
    reviewer = SimulatedReviewer(error_rate, seed=0)
    draw = np.random.default_rng(1)
    decisions = [
        (p, t, *reviewer.decide(f"/pool/{n}.png", p, t))
        for n, (p, t) in enumerate(draw.integers(0, 4, size=(20_000, 2)).tolist())
    ]
    wrong = [(p, t, action, grade) for p, t, action, grade in decisions if grade != t]
    assert len(wrong) / len(decisions) == pytest.approx(error_rate, abs=0.01)
    right = [d for d in decisions if d[3] == d[1]]
    # A right decision accepts a right grade and corrects a wrong one to the truth.
    assert all((action == "accept") == (p == t) for p, t, action, grade in right)
    # A slip accepts the model's wrong grade, or moves a right one to a neighbouring grade.
    assert all(
        (action, grade) == ("accept", p) if p != t else (action == "relabel" and abs(grade - t) == 1)
        for p, t, action, grade in wrong
    )
    if error_rate:
        kinds = Counter(action for _, _, action, _ in wrong)
        assert kinds["accept"] > 0 and kinds["relabel"] > 0
    # The same image gets the same decision from every queue order; another seed slips elsewhere.
    again = [reviewer.decide(f"/pool/{n}.png", p, t)[1] for n, (p, t, _, _) in enumerate(decisions)]
    assert again == [grade for _, _, _, grade in decisions]
    other = SimulatedReviewer(error_rate, seed=1)
    moved = [other.decide(f"/pool/{n}.png", p, t)[1] for n, (p, t, _, _) in enumerate(decisions)]
    assert (moved != again) == bool(error_rate)


def test_loop_split_keeps_groups_whole_and_hides_nothing_twice():
    samples = [Sample(f"/x/{n}.png", n % 4, str(n), group=f"p{n // 2}") for n in range(200)]
    split = loop_split(samples, 0.3, seed=0)
    parts = [split.labelled, split.pool, split.val, split.test]
    assert sorted(s.path for part in parts for s in part) == sorted(s.path for s in samples)
    for n, part in enumerate(parts):
        assert all(not shared_groups(part, other) for other in parts[n + 1 :])
    labelled = len(split.labelled) / (len(split.labelled) + len(split.pool))
    assert labelled == pytest.approx(0.3, abs=0.03)


def test_too_few_images_or_a_bad_grade_stop_in_words(tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("file,grade,dataset,group\na.jpg,0,x,1\nb.jpg,2,x,2\n")
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out.json")]) == 2
    assert "2 images are too few" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("file,grade,dataset,group\na.jpg,0,x,1\nb.jpg,7,x,2\n")
    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "out.json")]) == 2
    assert "labels.csv line 3" in capsys.readouterr().err and not (tmp_path / "out.json").exists()


def test_the_command_measures_all_four_arms_end_to_end(tmp_path, capsys, one_thread):
    write_dataset(tmp_path / "data", seed=4, n_train=60, n_test=0, n_val=0, n_messidor=0, size=80, workers=1)
    out = tmp_path / "loopgain.json"
    assert (
        main(
            [
                "--data",
                str(tmp_path / "data" / "aptos"),
                "--epochs",
                "1",
                "--rounds",
                "2",
                "--decisions",
                "4",
                "--error-rate",
                "0",
                "--threshold",
                "0",
                "--order",
                "random",
                "flip",
                "--train-args",
                TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed, said = capsys.readouterr()
    report = json.loads(out.read_text())
    (measured,) = report["runs"]
    arms, split = measured["arms"], measured["split"]
    assert set(arms) == {"baseline", "curated", "pseudo", "oracle"}
    assert list(arms["curated"]) == ["all", "random", "flip"]
    assert arms["baseline"][0]["train_images"] == split["labelled"]

    every = arms["curated"]["all"]
    # Reviewing every candidate decides the whole pool in round 1, all of it right.
    assert every[0]["decisions"] == every[0]["pool_labels"] == split["pool"]
    assert every[0]["label_errors"] == 0 and every[0]["corrections"] > 0
    assert every[1] == {**every[0], "round": 2, "candidates": 0}
    for order in ("random", "flip"):
        rows = arms["curated"][order]
        # At threshold 0 every prediction is a candidate: each round spends the whole budget
        # on images not decided before, and an error-free reviewer gives only true grades.
        assert [r["decisions"] for r in rows] == [4, 8]
        assert [r["pool_labels"] for r in rows] == [4, 8]
        assert [r["candidates"] for r in rows] == [split["pool"], split["pool"] - 4]
        assert [r["label_errors"] for r in rows] == [0, 0]
        assert all(r["corrections"] <= r["decisions"] for r in rows)
        assert [r["train_images"] for r in rows] == [split["labelled"] + 4, split["labelled"] + 8]
    pseudo = arms["pseudo"]
    assert [r["decisions"] for r in pseudo] == [0, 0]
    assert pseudo[0]["pool_labels"] == split["pool"] and pseudo[0]["label_errors"] > 0
    assert [r["corrections"] for r in pseudo] == [0, 0]
    # Nothing was left to label in round 2: the round-1 model stands, untrained again.
    assert pseudo[1] == {**pseudo[0], "round": 2, "candidates": 0}
    assert "INFO pseudo-r2: no new labels; the model stays" in said

    (oracle,) = arms["oracle"]
    assert oracle["pool_labels"] == split["pool"] and oracle["label_errors"] == 0
    assert oracle["train_images"] == split["labelled"] + split["pool"]

    rows = [arms["baseline"][0], oracle, *pseudo, *sum(arms["curated"].values(), [])]
    assert all(-1 <= r["qwk"] <= 1 and r["epochs"] >= 1 for r in rows)
    gains = measured["gains"]
    base = arms["baseline"][0]["qwk"]
    for order, rows in arms["curated"].items():
        assert gains[order]["per_100_decisions"] == pytest.approx(
            100 * (rows[-1]["qwk"] - base) / rows[-1]["decisions"]
        )
        assert gains[order]["per_100_over_random"] == pytest.approx(
            gains[order]["per_100_decisions"] - gains["random"]["per_100_decisions"]
        )
    assert gains["all"]["decisions"] == split["pool"]
    assert "| pseudo-labels, unreviewed | 2 |" in printed and f"written to {out}" in printed
    assert "| curated, every candidate | 1 |" in printed and "| flip order |" in printed


def test_repeats_measure_each_arm_on_new_splits_and_report_paired_differences_per_dataset(
    tmp_path, capsys, one_thread
):
    write_dataset(tmp_path / "data", seed=5, n_train=60, n_test=0, n_val=0, n_messidor=0, size=80, workers=1)
    aptos = tmp_path / "data" / "aptos"
    rows = (aptos / "train.csv").read_text().splitlines()[1:]
    with open(aptos / "labels.csv", "w") as labels:  # as ../shared/realdata: two datasets
        labels.write("file,grade,dataset,group\n")
        for n, row in enumerate(rows):
            name, grade = row.split(",")
            labels.write(f"train_images/{name}.png,{grade},{'ab'[n % 2]},{name}\n")
    out = tmp_path / "loopgain.json"
    argv = ["--data", str(aptos), "--epochs", "1", "--rounds", "1", "--threshold", "0", "--order"]
    argv += ["--no-oracle", "--repeats", "2", "--seed", "3", "--train-args", TINY, "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    first, second = report["runs"]
    assert (first["seed"], second["seed"]) == (3, 4)
    assert first["config"]["seed"] == 3 and second["config"]["seed"] == 4
    assert list(first["arms"]["curated"]) == ["all"]  # --order with no name: every candidate only
    assert "oracle" not in first["arms"] and "oracle" not in second["arms"]
    tests = [set(run["split"]) for run in report["runs"]]
    assert tests[0] == {"labelled", "pool", "val", "test"} == tests[1]

    found = report["differences"]
    assert set(found) == {"curated − baseline", "curated − unreviewed"}
    tested = first["split"]["test"] + second["split"]["test"]
    for compared, (a, b) in {
        "curated − baseline": ("all", "baseline"),
        "curated − unreviewed": ("all", "pseudo"),
    }.items():
        by_source = found[compared]
        assert list(by_source) == ["pooled", "a", "b"]
        assert by_source["pooled"]["repeats"] == 2 and by_source["pooled"]["images"] == tested
        assert by_source["a"]["images"] + by_source["b"]["images"] == tested
        # The pooled difference is the mean of each repeat's difference of the last rounds.
        last = [
            (run["arms"]["curated"][a][-1] if a == "all" else run["arms"][a][-1])["qwk"]
            - run["arms"][b][-1]["qwk"]
            for run in report["runs"]
        ]
        pooled = by_source["pooled"]["qwk"]
        assert pooled["value"] == pytest.approx(np.mean(last))
        assert pooled["interval"][0] <= pooled["value"] <= pooled["interval"][1]
    printed = capsys.readouterr().out
    assert "seed 3:" in printed and "seed 4:" in printed
    assert "| curated − unreviewed | b | 2 |" in printed


def test_an_arm_without_candidates_keeps_the_baseline_and_differs_from_it_by_nothing(tmp_path, one_thread):
    write_dataset(tmp_path / "data", seed=6, n_train=40, n_test=0, n_val=0, n_messidor=0, size=80, workers=1)
    out = tmp_path / "loopgain.json"
    argv = ["--data", str(tmp_path / "data" / "aptos"), "--epochs", "1", "--rounds", "1", "--order"]
    assert main([*argv, "--threshold", "1", "--no-oracle", "--train-args", TINY, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (measured,) = report["runs"]
    assert measured["arms"]["curated"]["all"][0]["pool_labels"] == 0
    for compared in ("curated − baseline", "curated − unreviewed"):
        assert report["differences"][compared]["pooled"]["qwk"]["value"] == 0
