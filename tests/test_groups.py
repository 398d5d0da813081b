"""No person on both sides of a split: groups from names and columns, group-whole splits,
and training that keeps validation's people and images out."""

import logging
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT, write_image

from db.queries import curated_set, labelled_images
from engine.data.datasets import Sample, folder_samples, same_content, shared_groups, stratified_split
from engine.data.groups import group_from_name, group_of
from engine.data.sources import ImportStopped, import_source
from engine.training.train import db_samples, keep_validation_apart


def test_groups_come_from_a_column_or_an_eyepacs_name():
    assert group_from_name("10_left") == "10" and group_from_name("10_RIGHT") == "10"
    assert group_from_name("IM003475") is None and group_from_name("a_b_left") == "a_b"
    assert group_of("10_left", {"patient": " p7 "}) == "p7"
    assert group_of("x", {"group": "", "patient": ""}) is None


def people(count: int, grades=(0, 1, 2, 3)) -> list[Sample]:
    return [
        Sample(f"/d/{p}_{eye}.png", grades[p % len(grades)], f"{p}_{eye}", group=str(p))
        for p in range(count)
        for eye in ("left", "right")
    ]


def test_a_split_keeps_each_person_whole_and_every_grade_on_both_sides():
    samples = people(40)
    train, val = stratified_split(samples, 0.2, seed=1)
    assert not shared_groups(train, val)
    assert len(val) == 16 and {s.grade for s in val} == {0, 1, 2, 3}
    assert stratified_split(samples, 0.2, seed=1) == (train, val)
    assert stratified_split(samples, 0.2, seed=2) != (train, val)


def test_class_folders_of_eyepacs_names_split_by_patient(tmp_path):
    for patient in range(12):
        for eye in ("left", "right"):
            write_image(tmp_path / str(patient % 4) / f"{patient}_{eye}.png", value=patient * 9 + 20)
    samples = folder_samples(tmp_path)
    assert {s.group for s in samples} == {str(p) for p in range(12)}
    train, val = stratified_split(samples, 0.25)
    assert val and not shared_groups(train, val)


def test_same_content_finds_copies_under_other_names(tmp_path):
    a = write_image(tmp_path / "a.png", value=10)
    b = write_image(tmp_path / "b.png", value=200)
    copy = tmp_path / "copy_of_a.png"
    shutil.copy(a, copy)
    found = same_content([Sample(str(copy)), Sample(str(b))], [Sample(str(a))])
    assert found == {str(copy)}


def test_training_leaves_out_validation_people_and_copies(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    val = [Sample("/v/7_left.png", 1, "7_left", group="7")]
    image = write_image(tmp_path / "v.png")
    copy = tmp_path / "copy.png"
    shutil.copy(image, copy)
    val.append(Sample(str(image), 2, "v"))
    train = [
        Sample("/t/7_right.png", 1, "7_right", group="7"),
        Sample(str(copy), 2, "copy"),
        Sample("/t/8_left.png", 0, "8_left", group="8"),
    ]
    kept = keep_validation_apart(train, val)
    assert [s.name for s in kept] == ["8_left"]
    log = caplog.text
    assert "2 groups known" in log and "left out of training: 2 images" in log


def test_importers_record_the_group_and_the_curated_set_carries_it(tmp_path, db_url):
    aptos = tmp_path / "aptos"
    aptos.mkdir()
    pd.DataFrame({"id_code": ["a", "b"], "diagnosis": [0, 2], "patient": ["p1", "p1"]}).to_csv(
        aptos / "train.csv", index=False
    )
    for name in ("a", "b"):
        write_image(aptos / "train_images" / f"{name}.png", value=30 + ord(name))
    import_source(db_url, "aptos", aptos, "train")
    write_image(tmp_path / "val" / "1" / "9_left.png", value=77)
    import_source(db_url, "folders", tmp_path / "val", "validation")
    assert list(curated_set(db_url)["group"]) == ["p1", "p1"]
    assert [row[-1] for row in labelled_images(db_url, "validation")] == ["9"]
    train, val = db_samples(db_url)
    assert {s.group for s in train} == {"p1"} and val[0].group == "9"


def test_one_folder_cannot_be_imported_as_training_and_validation(tiny_data, db_url):
    import_source(db_url, "folders", tiny_data / "validation", "validation")
    with pytest.raises(ImportStopped, match="cannot be both training and validation"):
        import_source(db_url, "folders", tiny_data / "validation", "train")


def test_the_training_log_says_how_people_were_kept_apart(tmp_path):
    for patient in range(8):
        for eye in ("left", "right"):
            write_image(
                tmp_path / "f" / str(patient % 4) / f"{patient}_{eye}.png",
                value=patient * 20 + (eye == "left"),
            )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.training.train",
            "--model",
            "test_efficientnet",
            "--img-size",
            "32",
            "--pretrained",
            "false",
            "--workers",
            "0",
            "--epochs",
            "1",
            "--data-path",
            str(tmp_path / "f"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(tmp_path / "ws")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "people kept apart: 8 groups known" in done.stderr
