"""Write a labelled set as class folders `<out>/<grade>/<file>`: the layout the seed's
preparing_data.py made, which its training script and the `folders` importer read."""

import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.grades import GRADES


class ExportRefused(FileExistsError):
    """The target already holds grade folders and replacing them was not asked for."""


@dataclass
class ExportResult:
    written: int = 0
    missing: list[str] = field(default_factory=list)  # source files that could not be copied


def _free_name(folder: Path, name: str, taken: set[Path]) -> Path:
    """`name` in `folder`, numbered when two sources hold files of the same name."""
    target, n = folder / name, 1
    while target in taken:
        n += 1
        target = folder / f"{Path(name).stem}_{n}{Path(name).suffix}"
    return target


def export_class_folders(files: Iterable[tuple[str, int]], out: Path,
                         replace: bool = False) -> ExportResult:
    """Copy each (path, grade) into `out/<grade>/`. Grade folders left by an earlier export
    are removed first when `replace` is set, so that no stale label survives; otherwise they
    make the export refuse. Files that cannot be read are listed, and the rest copied."""
    files = list(files)
    wrong = sorted({grade for _, grade in files if grade not in GRADES})
    if wrong:
        raise ValueError(f"grades must be 0-3, got {wrong}")
    folders = [out / str(grade) for grade in GRADES]
    used = [folder.name for folder in folders if folder.is_dir() and any(folder.iterdir())]
    if used and not replace:
        raise ExportRefused(f"{out} already holds grade folders {', '.join(used)}")
    for folder in folders:
        if folder.is_dir():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    result, taken = ExportResult(), set()
    for path, grade in files:
        target = _free_name(out / str(grade), Path(path).name, taken)
        try:
            shutil.copy2(path, target)
        except OSError:
            result.missing.append(str(path))
            continue
        taken.add(target)
        result.written += 1
    return result
