"""bench.realdata end to end on a small labelled set in the realdata layout: validation
figures for the defaults, the test split read once per finished recipe (never by a screen),
intervals on every figure and paired differences."""

import csv
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from bench.realdata import main
from engine.data import preprocess
from engine.data.datasets import folder_samples, labels_csv_samples
from engine.model.metrics import quadratic_weighted_kappa

TINY = "--model test_efficientnet --pretrained false --img-size 64 --batch-size 8 --workers 0 --lr 0.05"


def labelled_folder(tiny_data: Path, out: Path) -> Path:
    """labels.csv over the 40 synthetic APTOS training and class-folder images, two
    datasets, one person per image."""
    out.mkdir()
    with open(tiny_data / "aptos" / "train.csv", newline="") as file:
        rows = [
            (str(tiny_data / "aptos" / "train_images" / f"{r['id_code']}.png"), int(r["diagnosis"]))
            for r in csv.DictReader(file)
        ]
    rows += [(s.path, s.grade) for s in folder_samples(tiny_data / "validation")]
    with open(out / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "grade", "dataset", "group"])
        for n, (path, grade) in enumerate(rows):
            writer.writerow([path, grade, ("messidor-2", "eyepacs-2015-test")[n % 2], f"p{n}"])
    return out


def test_the_benchmark_reads_validation_for_screens_and_test_once_per_recipe(tiny_data, tmp_path):
    data = labelled_folder(tiny_data, tmp_path / "labelled")
    screen = tmp_path / "screen.json"
    assert (
        main(
            [
                "--data",
                str(data),
                "--minutes",
                "0.02",
                "--screen",
                "--train-args",
                f"{TINY} --epochs 1",
                "--out",
                str(screen),
            ]
        )
        == 0
    )
    report = json.loads(screen.read_text())
    assert "reference" not in report and "test" not in report["defaults"]
    assert "test_probs" not in report["defaults"]
    validation = report["defaults"]["validation"]
    assert set(validation) == {"pooled", "messidor-2", "eyepacs-2015-test"}
    for figure in ("qwk", "referable_auc", "sensitivity", "specificity"):
        low, high = validation["pooled"][figure]["interval"]
        assert low <= validation["pooled"][figure]["value"] <= high
    assert report["defaults"]["config"]["refit"] is False

    full = tmp_path / "full.json"
    assert main(["--data", str(data), "--minutes", "0.02", "--train-args", TINY, "--out", str(full)]) == 0
    report = json.loads(full.read_text())
    assert report["defaults"]["config"]["refit"] is True
    assert report["defaults"]["test"]["pooled"]["images"] == report["split"]["test"]
    assert {"test_1_views", "test_8_views"} <= report["reference"].keys()
    assert "sensitivity" not in report["reference"]["test_8_views"]["pooled"]  # no validation
    difference = report["defaults_minus_reference"]["pooled"]["qwk"]
    assert difference["interval"][0] <= difference["value"] <= difference["interval"][1]


def test_seeds_train_the_defaults_again_on_one_split_and_report_their_spread(
    tiny_data, tmp_path, capsys, monkeypatch
):
    data = labelled_folder(tiny_data, tmp_path / "labelled")
    decoded, original = [], preprocess.preprocess_file
    monkeypatch.setattr(
        preprocess, "preprocess_file", lambda path, cfg: decoded.append(path) or original(path, cfg)
    )
    out = tmp_path / "seeds.json"
    argv = ["--data", str(data), "--minutes", "0.001", "--screen", "--seeds", "3", "--seed", "1"]
    assert main([*argv, "--train-args", f"{TINY} --epochs 2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    runs = [report[f"defaults, seed {seed}"] for seed in (1, 2, 3)]
    assert [run["config"]["seed"] for run in runs] == [1, 2, 3] and report["split"]["seed"] == 1
    # The epochs given, not what fits into the minutes; every photograph decoded once in all.
    assert [run["epochs"] for run in runs] == [2, 2, 2]
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 40
    assert "reference" not in report and "test" not in report["spread"]
    # One split, trainings that differ.
    assert runs[0]["validation_images"] == runs[1]["validation_images"] == runs[2]["validation_images"]
    assert runs[0]["validation_probs"] != runs[1]["validation_probs"]
    qwk = [run["validation"]["pooled"]["qwk"]["value"] for run in runs]
    found = report["spread"]["validation"]["pooled"]["qwk"]
    assert found["runs"] == 3 and found["mean"] == pytest.approx(np.mean(qwk))
    assert found["sd"] == pytest.approx(np.std(qwk, ddof=1)) and found["min"] == min(qwk)
    # Every pair of runs with their probabilities averaged, each scored as one model.
    samples, _ = labels_csv_samples(data)
    grade = {s.path: s.grade for s in samples}
    truth = [grade[path] for path in runs[0]["validation_images"]]
    probs = [np.array(run["validation_probs"]) for run in runs]
    averaged = [quadratic_weighted_kappa(truth, ((a + b) / 2).argmax(1)) for a, b in combinations(probs, 2)]
    pairs = report["spread"]["validation, two runs averaged"]["pooled"]["qwk"]
    assert pairs["runs"] == 3 and pairs["mean"] == pytest.approx(np.mean(averaged))
    assert pairs["sd"] == pytest.approx(np.std(averaged, ddof=1))
    printed = capsys.readouterr().out
    assert "| validation | eyepacs-2015-test | 3 |" in printed
    assert "| validation, two runs averaged | pooled | 3 |" in printed


def test_a_screen_against_an_earlier_one_reports_their_paired_validation_difference(
    tiny_data, tmp_path, capsys
):
    data = labelled_folder(tiny_data, tmp_path / "labelled")
    argv = ["--data", str(data), "--minutes", "0.02", "--screen"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert main([*argv, "--train-args", f"{TINY} --epochs 1", "--out", str(first)]) == 0
    with pytest.raises(SystemExit, match="not this split's"):
        main([*argv, "--seed", "1", "--against", str(first), "--out", str(tmp_path / "no.json")])
    with pytest.raises(SystemExit, match="not a bench.realdata report of the defaults"):
        main([*argv, "--against", str(data / "labels.csv"), "--out", str(tmp_path / "no.json")])
    assert not (tmp_path / "no.json").exists()  # refused before any training

    argv += ["--against", str(first), "--out", str(second)]
    assert main([*argv, "--train-args", f"{TINY} --epochs 2"]) == 0
    earlier, report = json.loads(first.read_text()), json.loads(second.read_text())
    found = report["against"]["validation_difference"]
    for source in ("pooled", "messidor-2", "eyepacs-2015-test"):
        qwk = [r["defaults"]["validation"][source]["qwk"]["value"] for r in (report, earlier)]
        assert found[source]["qwk"]["value"] == pytest.approx(qwk[0] - qwk[1])
    assert f"| validation split, this run - {first} |" in capsys.readouterr().out
