"""Write a labelled set as class folders `<out>/<grade>/<file>`: the layout the seed's
preparing_data.py made, which its training script and the `folders` importer read.

An export lists what it wrote in `<out>/.dr-export.json`; replacing it removes only those
files, so that no folder the export did not fill (a dataset's own class folders, say) loses
anything. Exports write only under the workspace or a folder named in `DR_EXPORT_ROOTS`, since
the folder comes from a browser."""

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from db.users import User, require_admin
from grades import GRADES

MANIFEST = ".dr-export.json"


class ExportRefused(Exception):
    """The export would write into or remove from a folder it must not touch; the message
    says why, in words."""


class EarlierExport(ExportRefused):
    """The target holds an earlier export and replacing it was not asked for."""


@dataclass
class ExportResult:
    written: int = 0
    missing: list[str] = field(default_factory=list)  # source files that could not be copied


def _targets(files: list[tuple[str, int]], out: Path) -> list[Path]:
    """Where each file goes: `out/<grade>/<name>`, numbered when two sources hold files of
    the same name."""
    targets: dict[Path, None] = {}  # ordered, and a fast `in`
    for path, grade in files:
        name, n = Path(path), 1
        target = out / str(grade) / name.name
        while target in targets:
            n += 1
            target = out / str(grade) / f"{name.stem}_{n}{name.suffix}"
        targets[target] = None
    return list(targets)


def export_roots(workspace_root: Path) -> list[Path]:
    """The folders exports may write under: the workspace, and those that the setting
    `DR_EXPORT_ROOTS` lists (separated by os.pathsep)."""
    named = os.environ.get("DR_EXPORT_ROOTS", "").split(os.pathsep)
    return [workspace_root.resolve(), *(Path(p).expanduser().resolve() for p in named if p)]


def _refuse_outside(out: Path, roots: Iterable[Path]) -> None:
    roots = list(roots)
    if not any(out.is_relative_to(root) for root in roots):
        raise ExportRefused(
            f"{out} is outside the folders exports may write to "
            f"({', '.join(map(str, roots))}): choose a folder under one of "
            "them, or have the server started with that folder in "
            "DR_EXPORT_ROOTS"
        )


def _refuse_source_folders(out: Path, source_roots: Iterable[str]) -> None:
    grade_folders = [out / str(grade) for grade in GRADES]
    for root in map(Path, source_roots):
        if out.is_relative_to(root) or any(root.is_relative_to(f) for f in grade_folders):
            raise ExportRefused(
                f"{out} is inside the folder of an imported dataset ({root}) "
                "or holds one: choose a folder of its own for the export"
            )


def _exported(out: Path) -> set[Path]:
    """The files an earlier export listed in its manifest, none outside the grade folders."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return set()
    listed = {out / name for name in json.loads(manifest.read_text())["files"]}
    folders = {out / str(grade) for grade in GRADES}
    return {path for path in listed if path.parent in folders and ".." not in path.parts}


def _clear_earlier_export(out: Path, replace: bool) -> None:
    """Remove what an earlier export wrote; refuse if the grade folders hold anything else."""
    present = {path for grade in GRADES for path in (out / str(grade)).glob("*")}
    earlier = _exported(out)
    foreign = [path.relative_to(out).as_posix() for path in sorted(present - earlier)]
    if foreign:
        raise ExportRefused(
            f"{out} already holds class folders with files that no export of "
            f"this app listed as its own ({', '.join(foreign[:3])}"
            f"{'…' if len(foreign) > 3 else ''}): choose an empty folder"
        )
    if present and not replace:
        raise EarlierExport(f"{out} already holds grade folders of an earlier export")
    for path in earlier:
        path.unlink(missing_ok=True)


def export_class_folders(
    files: Iterable[tuple[str, int]],
    out: Path,
    replace: bool = False,
    source_roots: Iterable[str] = (),
    *,
    db_url: str,
    user: User | None,
    roots: Iterable[Path],
) -> ExportResult:
    """Copy each (path, grade) into `out/<grade>/`, for `user`, an admin as the workspace's
    database `db_url` says now, or db.users.TERMINAL. An `out` outside `roots` (export_roots)
    is refused. An earlier export there makes the export refuse, or is removed first when
    `replace` is set, so that no stale label survives; any other file in the grade folders, or
    an `out` inside or around one of `source_roots` (the datasets' own folders), refuses it.
    Files that cannot be read are listed, the rest copied."""
    require_admin(db_url, user, "export labels")
    files, out = list(files), out.resolve()  # links resolved: none leads outside the roots
    _refuse_outside(out, roots)
    wrong = sorted({grade for _, grade in files if grade not in GRADES})
    if wrong:
        raise ValueError(f"grades must be 0-3, got {wrong}")
    _refuse_source_folders(out, source_roots)
    _clear_earlier_export(out, replace)
    targets = _targets(files, out)
    for grade in GRADES:
        (out / str(grade)).mkdir(parents=True, exist_ok=True)
    # Listed before copying: a copy cut short leaves nothing that a later replace would refuse.
    (out / MANIFEST).write_text(
        json.dumps({"files": [target.relative_to(out).as_posix() for target in targets]})
    )
    result = ExportResult()
    for (path, _), target in zip(files, targets, strict=True):
        try:
            shutil.copy2(path, target)
        except OSError:
            result.missing.append(str(path))
            continue
        result.written += 1
    return result
