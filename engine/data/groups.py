"""Which person an image belongs to, so that no person lands on both sides of a split.

An importer records it in the image's `extra["group"]`: from a `group` or `patient` column of
the annotation file, else from an EyePACS-style name `<patient>_left` / `<patient>_right`.
"""

import re

GROUP_COLUMNS = ("group", "patient")
_EYE_SUFFIX = re.compile(r"^(?P<patient>.+)_(left|right)$", re.IGNORECASE)


def group_from_name(name: str) -> str | None:
    """The patient of an EyePACS-style name, None when the name does not tell."""
    match = _EYE_SUFFIX.match(name)
    return match["patient"] if match else None


def group_of(name: str, row: dict | None = None) -> str | None:
    """The group from an annotation row's group/patient column, else from the name."""
    for column in GROUP_COLUMNS:
        value = str((row or {}).get(column, "")).strip()
        if value:
            return value
    return group_from_name(name)
