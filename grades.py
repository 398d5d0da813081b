"""The grading scale: Messidor 0-3, and how other scales map onto it."""

GRADES: tuple[int, ...] = (0, 1, 2, 3)
GRADE_NAMES: dict[int, str] = {
    0: "0 · no DR",
    1: "1 · mild",
    2: "2 · moderate",
    3: "3 · severe / proliferative",
}


def from_aptos(diagnosis: int) -> int:
    """APTOS 2019 / ICDR 0-4 to Messidor 0-3: severe (3) and proliferative (4) merge into 3."""
    if diagnosis not in (0, 1, 2, 3, 4):
        raise ValueError(f"APTOS diagnosis must be 0-4, got {diagnosis}")
    return min(diagnosis, 3)


# Predictions at or above this calibrated confidence become review candidates.
REVIEW_THRESHOLD = 0.70

# Below 0.41 a QWK is at best "fair" agreement on Landis & Koch's scale, while graders agree
# with each other at 0.6-0.8 on DR grades: a model under it would fill the review queue with
# mistakes.
WEAK_QWK = 0.4
# A model that gives one grade to this share of what it predicted has not learned the others.
DOMINANT_SHARE = 0.9
