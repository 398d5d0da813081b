"""Whether a model is fit to propose grades (engine/model/quality.py), its calibration in sentences,
and the warnings the Review and Inference pages show about it."""

import numpy as np
import pytest
import torch
from conftest import CALIBRATION, open_page

from db.predictions import run_grade_counts
from db.runs import run_calibration, run_score
from db.schema import Image, Prediction, Run, Source
from db.session import session_scope
from engine.model.calibration import calibration_summary, confident_at
from engine.model.quality import calibration_lines, clipped_warning, model_warnings, threshold_accuracy
from grades import DOMINANT_SHARE, WEAK_QWK

WEAK = (
    "The active model's validation QWK is 0.20, below 0.40: its proposals are more often "
    "wrong than a reviewer can correct; retrain it before reviewing."
)


def test_a_good_model_gets_no_warning():
    assert model_warnings(0.72, [50, 20, 20, 10]) == []
    assert model_warnings(None, []) == []  # never validated, nothing predicted: nothing to say
    assert model_warnings(WEAK_QWK, [85, 5, 5, 5]) == []  # at the floor; 85 % is not dominant


def test_a_weak_model_is_named_with_its_score():
    assert model_warnings(0.2, [50, 20, 20, 10]) == [WEAK]
    chosen = model_warnings(0.399, [1, 1, 1, 1], "The chosen model")
    assert chosen == [WEAK.replace("The active", "The chosen").replace("0.20", "0.40")]


def test_one_grade_for_nearly_every_image_is_named_with_its_share():
    assert model_warnings(0.7, [1856, 40, 20, 12]) == [
        "The active model gives grade 0 · no DR to 96 % of the 1,928 images it predicted: it "
        "has probably not learned the other grades."
    ]
    exactly = model_warnings(0.7, [1, 1, 0, 18])  # the share DOMINANT_SHARE itself counts
    assert DOMINANT_SHARE == 0.9 and len(exactly) == 1
    assert "grade 3 · severe / proliferative to 90 % of the 20 images" in exactly[0]
    assert len(model_warnings(0.1, [0, 0, 7, 0])) == 2


def test_calibration_in_sentences():
    assert calibration_lines(CALIBRATION) == [
        "Temperature T = 1.80, fitted on 200 validation images.",
        "ECE 0.120 → 0.034, NLL 0.950 → 0.810 (before → after temperature scaling).",
        "Of 120 validation images at ≥ 0.70 confidence, 85 % were right.",
    ]
    assert clipped_warning(CALIBRATION) is None
    clipped = clipped_warning({**CALIBRATION, "temperature": 4.0, "bounded": True})
    assert clipped.startswith("The temperature was clipped at its bound (T = 4.00)")
    assert (
        calibration_lines({**CALIBRATION, "confident": 0})[-1]
        == "No validation image reached 0.70 confidence after calibration."
    )


def test_an_old_runs_calibration_says_what_it_has():
    assert calibration_lines({}) == [] and clipped_warning({}) is None
    assert calibration_lines({"temperature": 2.0, "ece_before": 0.1, "ece_after": 0.05}) == [
        "Temperature T = 2.00.",
        "ECE 0.100 → 0.050 (before → after temperature scaling).",
    ]
    assert (
        calibration_lines({"temperature": 1.0, "ece_after": 0.05})[1]
        == "ECE not recorded → 0.050 (before → after temperature scaling)."
    )


def test_what_training_writes_reads_as_sentences():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (60,), generator=generator)
    logits = torch.randn(60, 4, generator=generator) + 4 * torch.nn.functional.one_hot(labels, 4)
    summary = calibration_summary(logits * 3, labels, np.arange(60) % 2)
    lines = calibration_lines(summary)
    assert lines[0].startswith("Temperature T = ") and "fitted on 60 validation images" in lines[0]
    assert lines[1].startswith(f"ECE {summary['ece_before']:.3f} → {summary['ece_after']:.3f}")
    assert lines[2].startswith(f"Of {summary['confident']} validation images at ≥ 0.70")


def test_the_accuracy_at_a_review_threshold_is_what_the_calibration_stored():
    assert (
        threshold_accuracy(CALIBRATION, 0.70)
        == "Of 120 validation images at ≥ 0.70 confidence, 85 % were right."
    )
    # From the reliability bins after calibration: (0.5, 0.6] 80 images, (0.8, 0.9] 120.
    assert (
        threshold_accuracy(CALIBRATION, 0.5)
        == "Of 200 validation images at ≥ 0.50 confidence, 73 % were right."
    )
    assert (
        threshold_accuracy(CALIBRATION, 0.9)
        == "No validation image reached 0.90 confidence after calibration."
    )
    assert threshold_accuracy(CALIBRATION, 0.75) == (
        "Of 120 validation images at ≥ 0.70 confidence, 85 % were right. (No figure for 0.75: "
        "the stored calibration has one for 0.70 and for steps of 0.10.)"
    )
    assert threshold_accuracy(CALIBRATION, 1.0).endswith(
        "(No figure for 1.00: the stored calibration has one for 0.70 and for steps of 0.10.)"
    )
    assert threshold_accuracy({}, 0.7) is None
    assert threshold_accuracy({"temperature": 2.0, "ece_after": 0.05}, 0.8) is None


def test_the_bins_give_what_measuring_at_the_threshold_gives():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 4, (400,), generator=generator)
    logits = torch.randn(400, 4, generator=generator) + 3 * torch.nn.functional.one_hot(labels, 4)
    folds = np.arange(400) % 2
    stored = calibration_summary(logits, labels, folds)
    for threshold in (0.3, 0.5, 0.8, 0.9):
        measured = calibration_summary(logits, labels, folds, threshold)
        assert measured["confident"] > 0
        assert confident_at(stored, threshold) == (
            threshold,
            measured["confident"],
            measured["confident_right"],
        )


# -- the pages ------------------------------------------------------------------------------------


def model_with_predictions(db_url: str, best_qwk: float, grades: list[int]) -> int:
    """An active run with a checkpoint and one prediction per grade in `grades`, on a pool."""
    with session_scope(db_url) as session:
        pool = Source(kind="unlabelled", root="/nowhere", role="unlabelled", name="pool")
        run = Run(
            name="judged",
            model_name="m",
            img_size=64,
            checkpoint="/w/judged.pth",
            best_qwk=best_qwk,
            active=True,
            status="done",
        )
        session.add_all([pool, run])
        session.flush()
        for i, grade in enumerate(grades):
            image = Image(source_id=pool.id, path=f"{i}.png", name=f"id{i}", width=8, height=8)
            session.add(image)
            session.flush()
            probs = [0.12] * 4
            probs[grade] = 0.64  # below the review threshold: no card for these unreal files
            session.add(
                Prediction(
                    run_id=run.id,
                    image_id=image.id,
                    p0=probs[0],
                    p1=probs[1],
                    p2=probs[2],
                    p3=probs[3],
                    grade=grade,
                    confidence=0.64,
                )
            )
        return run.id


SPREAD = [0] * 10 + [1] * 4 + [2] * 4 + [3] * 2
ONE_GRADE = [2] * 19 + [0]
DOMINANT = (
    "{} gives grade 2 · moderate to 95 % of the 20 images it predicted: it has "
    "probably not learned the other grades."
)


@pytest.mark.parametrize("page, model", [("review", "The active model"), ("inference", "The chosen model")])
@pytest.mark.parametrize(
    "qwk, grades, expected",
    [
        (0.75, SPREAD, []),
        (0.2, SPREAD, [WEAK]),
        (0.75, ONE_GRADE, [DOMINANT]),
    ],
)
def test_pages_warn_about_a_weak_or_one_grade_model(workspace, page, model, qwk, grades, expected):
    run_id = model_with_predictions(workspace.db_url, qwk, grades)
    assert run_score(workspace.db_url, run_id) == ("judged", qwk)
    assert run_grade_counts(workspace.db_url, run_id) == {g: grades.count(g) for g in set(grades)}
    at = open_page(page)
    assert [w.value for w in at.warning] == [
        e.replace("The active model", model).format(model) for e in expected
    ]
    assert f"**judged** · validation QWK {qwk:.3f}" in at.caption[0].value


def test_calibration_reads_the_column_with_the_runs_temperature(db_url):
    with session_scope(db_url) as session:
        old, new = (
            Run(name="old", model_name="m", img_size=64),
            Run(
                name="new",
                model_name="m",
                img_size=64,
                temperature=2.5,
                calibration={"ece_before": 0.1, "ece_after": 0.05},
            ),
        )
        session.add_all([old, new])
        session.flush()
        ids = old.id, new.id
    assert run_calibration(db_url, ids[0]) == {}
    assert run_calibration(db_url, ids[1]) == {"temperature": 2.5, "ece_before": 0.1, "ece_after": 0.05}
