"""Whether a model is fit to propose grades, and what its calibration summary says, in
sentences for the pages."""

import math

from engine.model.calibration import RELIABILITY_BINS, confident_at
from grades import DOMINANT_SHARE, GRADE_NAMES, REVIEW_THRESHOLD, WEAK_QWK


def model_warnings(
    val_qwk: float | None, grade_counts: list[int], model: str = "The active model"
) -> list[str]:
    """Why `model` should not feed the review queue: a validation QWK below WEAK_QWK, or one
    grade given to DOMINANT_SHARE or more of the images it predicted (counts per grade)."""
    warnings = []
    if val_qwk is not None and val_qwk < WEAK_QWK:
        warnings.append(
            f"{model}'s validation QWK is {val_qwk:.2f}, below {WEAK_QWK:.2f}: its "
            "proposals are more often wrong than a reviewer can correct; retrain it "
            "before reviewing."
        )
    total = sum(grade_counts)
    if total:
        grade = max(range(len(grade_counts)), key=grade_counts.__getitem__)
        share = grade_counts[grade] / total
        if share >= DOMINANT_SHARE:
            warnings.append(
                f"{model} gives grade {GRADE_NAMES[grade]} to {100 * share:.0f} % "
                f"of the {total:,} images it predicted: it has probably not learned "
                "the other grades."
            )
    return warnings


def _temperature_line(calibration: dict) -> str | None:
    if "temperature" not in calibration:
        return None
    images = calibration.get("images")
    fitted = f", fitted on {images:,} validation images" if images else ""
    return f"Temperature T = {calibration['temperature']:.2f}{fitted}."


def _change(calibration: dict, name: str, key: str) -> str | None:
    values = [calibration.get(f"{key}_{when}") for when in ("before", "after")]
    if values == [None, None]:
        return None
    before, after = ("not recorded" if v is None else f"{v:.3f}" for v in values)
    return f"{name} {before} → {after}"


def _error_line(calibration: dict) -> str | None:
    changes = [c for c in (_change(calibration, "ECE", "ece"), _change(calibration, "NLL", "nll")) if c]
    return f"{', '.join(changes)} (before → after temperature scaling)." if changes else None


def _confident_sentence(threshold: float, confident: int, right: int) -> str:
    if not confident:
        return f"No validation image reached {threshold:.2f} confidence after calibration."
    return (
        f"Of {confident:,} validation images at ≥ {threshold:.2f} confidence, "
        f"{100 * right / confident:.0f} % were right."
    )


def _confident_line(calibration: dict) -> str | None:
    if "confident" not in calibration or "confident_right" not in calibration:
        return None
    return _confident_sentence(
        calibration.get("threshold", REVIEW_THRESHOLD),
        calibration["confident"],
        calibration["confident_right"],
    )


def threshold_accuracy(calibration: dict, threshold: float) -> str | None:
    """How often the run was right on the validation images at or above `threshold`, as far
    as its stored calibration tells (engine.model.calibration.confident_at); None if it tells nothing."""
    measured = confident_at(calibration, threshold)
    if measured is None:
        return None
    line = _confident_sentence(*measured)
    if math.isclose(measured[0], threshold):
        return line
    return (
        f"{line} (No figure for {threshold:.2f}: the stored calibration has one for "
        f"{measured[0]:.2f} and for steps of {1 / RELIABILITY_BINS:.2f}.)"
    )


def calibration_lines(calibration: dict) -> list[str]:
    """The sentences of a run's calibration summary (engine.model.calibration.calibration_summary),
    as far as it was recorded: an old run's dict may lack any key."""
    return [
        line
        for line in (_temperature_line(calibration), _error_line(calibration), _confident_line(calibration))
        if line
    ]


def clipped_warning(calibration: dict) -> str | None:
    """A sentence when the temperature fit hit its bounds and was clipped."""
    if not calibration.get("bounded"):
        return None
    temperature = calibration.get("temperature")
    value = "" if temperature is None else f" (T = {temperature:.2f})"
    return (
        f"The temperature was clipped at its bound{value}: the validation set may be too "
        "small, or the model has not learned; its confidences are not to be trusted."
    )
