"""The synthetic fundus generator: Messidor grading rules, lesion placement, the dataset layouts
and byte-for-byte determinism."""

import csv
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from engine.data.synth import (
    APTOS_STYLE,
    VALIDATION_STYLE,
    Lesions,
    Style,
    draw_fundus,
    grade_from_counts,
    plan_scene,
    render,
    sample_lesions,
    write_dataset,
)
from grades import from_aptos

SMALL = dict(n_train=10, n_test=6, n_val=8, n_messidor=3, size=96)
IMAGE_SUFFIXES = {".png", ".tif"}


@pytest.mark.parametrize(
    "ma, h, nv, grade",
    [
        (0, 0, False, 0),
        (1, 0, False, 1),
        (5, 0, False, 1),
        (6, 0, False, 2),
        (14, 0, False, 2),
        (15, 0, False, 3),
        (0, 1, False, 2),
        (3, 1, False, 2),
        (0, 4, False, 2),
        (14, 4, False, 2),
        (0, 5, False, 3),
        (0, 0, True, 3),
        (2, 0, True, 3),
        (40, 20, True, 3),
    ],
)
def test_grade_from_counts_follows_messidor_rules(ma, h, nv, grade):
    assert grade_from_counts(ma, h, nv) == grade


def test_grade_from_counts_rejects_negative_counts():
    with pytest.raises(ValueError):
        grade_from_counts(-1, 0, False)


@pytest.mark.parametrize("grade", [0, 1, 2, 3])
def test_sample_lesions_gives_the_asked_grade(grade):
    for i in range(300):
        lesions = sample_lesions(grade, np.random.default_rng([grade, i]))
        assert lesions.grade == grade
        assert (lesions.exudates > 0) == (lesions.edema_risk > 0)
        if grade < 2:
            assert lesions.cotton_wool == 0
        if lesions.nv:
            assert grade == 3


def test_sample_lesions_rejects_unknown_grade():
    with pytest.raises(ValueError):
        sample_lesions(4, np.random.default_rng(0))


def test_the_planned_scene_is_what_draw_fundus_draws():
    lesions = Lesions(ma=8, haemorrhages=2, exudates=10, cotton_wool=1, nv=True, edema_risk=2)
    drawn = draw_fundus(lesions, np.random.default_rng(5), 128)
    rng = np.random.default_rng(5)
    assert np.array_equal(drawn, render(plan_scene(lesions, rng, 128), rng))


@pytest.mark.parametrize("risk", [1, 2])
@pytest.mark.parametrize("style", [APTOS_STYLE, Style(cut_p=1.0)])
def test_exudates_lie_where_the_edema_risk_says(risk, style):
    lesions = Lesions(ma=3, haemorrhages=1, exudates=20, cotton_wool=0, nv=False, edema_risk=risk)
    for i in range(40):
        scene = plan_scene(lesions, np.random.default_rng([risk, i]), 160, style)
        assert len(scene.exudates) == lesions.exudates
        dist = np.hypot(*(scene.exudates[:, :2] - scene.fovea).T)
        radius = scene.exudates[:, 2]
        if risk == 2:
            assert np.all(dist + radius < scene.disc_diameter)
        else:
            assert np.all(dist - radius > scene.disc_diameter)


def test_no_exudates_without_edema_risk():
    lesions = Lesions(ma=8, haemorrhages=2, exudates=0, cotton_wool=1, nv=False, edema_risk=0)
    scene = plan_scene(lesions, np.random.default_rng(1), 128)
    assert len(scene.exudates) == 0
    assert len(scene.microaneurysms) == 8


def test_lesion_counts_are_drawn():
    lesions = Lesions(ma=7, haemorrhages=3, exudates=9, cotton_wool=2, nv=True, edema_risk=1)
    scene = plan_scene(lesions, np.random.default_rng(2), 128)
    assert len(scene.microaneurysms) == 7
    assert len(scene.exudates) == 9
    assert len(scene.cotton_wool) == 2
    assert scene.nv
    assert len(scene.haemorrhages) >= 3 * 2  # every blot is two or more ellipses


def _assert_fundus_like(image: np.ndarray) -> None:
    h, w = image.shape[:2]
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        assert corner.max() == 0
    centre = image[h * 2 // 5 : h * 3 // 5, w * 2 // 5 : w * 3 // 5].astype(float)
    red, green, blue = centre.reshape(-1, 3).mean(axis=0)
    assert red > 70 and red > green > blue  # orange-red, not grey


def test_drawn_images_are_fundus_like():
    for i in range(30):
        rng = np.random.default_rng(i)
        image = draw_fundus(sample_lesions(i % 4, rng), rng, 128)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] == 128
        assert 128 <= image.shape[1] <= 1.5 * 128 * 1.2
        _assert_fundus_like(image)


def test_cut_fields_are_flat_with_black_top_and_bottom_rows():
    for i in range(10):
        rng = np.random.default_rng(i)
        image = draw_fundus(sample_lesions(2, rng), rng, 128, Style(cut_p=1.0))
        _assert_fundus_like(image)
        assert image[0].max() == 0 and image[-1].max() == 0
        lit_rows = np.flatnonzero(image.max(axis=(1, 2)) > 20)
        # Just inside the cut the field spans most of the width: a flat edge, not a round one.
        top_row = image[lit_rows[0] + 1].max(axis=1)
        assert np.count_nonzero(top_row > 20) > 0.4 * image.shape[1]


def test_validation_style_is_never_cut():
    for i in range(20):
        rng = np.random.default_rng(i)
        scene = plan_scene(sample_lesions(3, rng), rng, 96, VALIDATION_STYLE)
        assert scene.cut is None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    calls = []
    counts = write_dataset(out, seed=0, progress=lambda done, total: calls.append((done, total)), **SMALL)
    assert counts["total"] == 10 + 6 + 8 + 3 + 3
    assert calls[-1] == (counts["total"], counts["total"])
    assert [done for done, _ in calls] == list(range(1, counts["total"] + 1))
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    write_dataset(tmp_path / "b", seed=0, **SMALL)
    write_dataset(tmp_path / "c", seed=1, **SMALL)
    first = _hashes(dataset)
    assert first == _hashes(tmp_path / "b")
    other = _hashes(tmp_path / "c")
    assert first["aptos/train.csv"] != other["aptos/train.csv"]
    assert set(first.values()).isdisjoint(h for name, h in other.items() if not name.endswith(".csv"))


def test_worker_processes_do_not_change_the_files(tmp_path):
    sizes = dict(n_train=32, n_test=0, n_val=0, n_messidor=0, size=48)
    write_dataset(tmp_path / "one", seed=3, workers=1, **sizes)
    write_dataset(tmp_path / "two", seed=3, workers=2, **sizes)
    assert _hashes(tmp_path / "one") == _hashes(tmp_path / "two")


def test_csv_columns(dataset):
    assert _header(dataset / "aptos/train.csv") == ["id_code", "diagnosis"]
    assert _header(dataset / "aptos/test.csv") == ["id_code"]
    assert _header(dataset / "test_labels.csv") == ["id_code", "diagnosis"]
    assert _header(dataset / "messidor/Mess1_annotation_train.csv") == [
        "",
        "image",
        "quality",
        "type",
        "Retinopathy_grade",
        "Risk_of_macular_edema",
    ]
    assert _header(dataset / "messidor_base/Annotation_Base11.csv") == [
        "Image name",
        "Ophthalmologic department",
        "Retinopathy grade",
        "Risk of macular edema ",
    ]
    assert _header(dataset / "lesions.csv") == [
        "path",
        "split",
        "ma",
        "haemorrhages",
        "exudates",
        "cotton_wool",
        "nv",
        "edema_risk",
        "grade",
    ]
    assert not (dataset / "aptos/test_labels.csv").exists()


def test_lesions_csv_covers_every_image(dataset):
    lesions = pd.read_csv(dataset / "lesions.csv")
    images = {p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.suffix in IMAGE_SUFFIXES}
    assert set(lesions["path"]) == images
    assert len(lesions) == len(images) == 30
    recomputed = [grade_from_counts(r.ma, r.haemorrhages, bool(r.nv)) for r in lesions.itertuples()]
    assert lesions["grade"].tolist() == recomputed


def test_aptos_labels_match_the_lesions(dataset):
    lesions = pd.read_csv(dataset / "lesions.csv").set_index("path")
    train = pd.read_csv(dataset / "aptos/train.csv", dtype={"id_code": str})
    test = pd.read_csv(dataset / "test_labels.csv", dtype={"id_code": str})
    for folder, table in (("train_images", train), ("test_images", test)):
        for id_code, diagnosis in table.itertuples(index=False):
            assert len(id_code) == 12 and all(c in "0123456789abcdef" for c in id_code)
            row = lesions.loc[f"aptos/{folder}/{id_code}.png"]
            assert from_aptos(diagnosis) == row["grade"]
            assert (diagnosis == 4) == bool(row["nv"])
    unlabelled = pd.read_csv(dataset / "aptos/test.csv", dtype=str)
    assert set(unlabelled["id_code"]) == set(test["id_code"])


def test_diagnosis_4_is_grade_3_with_neovascularisation(tmp_path):
    write_dataset(tmp_path, seed=2, n_train=80, n_test=0, n_val=0, n_messidor=0, size=32)
    train = pd.read_csv(tmp_path / "aptos/train.csv", dtype={"id_code": str})
    lesions = pd.read_csv(tmp_path / "lesions.csv")
    nv = dict(zip(lesions["path"], lesions["nv"], strict=True))
    grades = dict(zip(lesions["path"], lesions["grade"], strict=True))
    paths = "aptos/train_images/" + train["id_code"] + ".png"
    assert set(train["diagnosis"]) == {0, 1, 2, 3, 4}
    for path, diagnosis in zip(paths, train["diagnosis"], strict=True):
        assert (diagnosis == 4) == bool(nv[path])
        assert from_aptos(diagnosis) == grades[path]


def test_messidor_layouts(dataset):
    lesions = pd.read_csv(dataset / "lesions.csv").set_index("path")
    mess1 = pd.read_csv(dataset / "messidor/Mess1_annotation_train.csv", index_col=0)
    base = pd.read_csv(dataset / "messidor_base/Annotation_Base11.csv")
    assert len(mess1) == len(base) == 3
    for folder, names, grades, risks in (
        ("messidor", mess1["image"], mess1["Retinopathy_grade"], mess1["Risk_of_macular_edema"]),
        ("messidor_base", base["Image name"], base["Retinopathy grade"], base["Risk of macular edema "]),
    ):
        for name, grade, risk in zip(names, grades, risks, strict=True):
            assert name.endswith("_PP.tif") and len(name) == len("20051019_38557_0100_PP.tif")
            row = lesions.loc[f"{folder}/{name}"]
            assert (row["grade"], row["edema_risk"]) == (grade, risk)
            image = cv2.imread(str(dataset / folder / name))
            assert image.shape[:2] == (96, 144)
    assert set(mess1["quality"]) == {1} and set(mess1["type"]) == {"PP"}


def test_validation_is_balanced_in_class_folders(dataset):
    lesions = pd.read_csv(dataset / "lesions.csv")
    val = lesions[lesions["split"] == "validation"]
    assert val["grade"].value_counts().to_dict() == {0: 2, 1: 2, 2: 2, 3: 2}
    for path, grade in zip(val["path"], val["grade"], strict=True):
        assert Path(path).parent == Path("validation") / str(grade)


def test_written_images_are_fundus_like(dataset):
    for path in dataset.rglob("*"):
        if path.suffix in IMAGE_SUFFIXES:
            image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            assert image.shape[0] == 96
            _assert_fundus_like(image)
