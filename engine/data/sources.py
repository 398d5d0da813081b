"""Importing datasets: APTOS 2019, Messidor (both CSV forms and spreadsheets), class folders
and plain unlabelled folders. Every bad row or file is reported by name and reason; the good
ones are imported, and importing the same source again changes nothing. Symbolic links in a
source are followed to the files they name; a listed path with '..' is refused.

The data roots (a shared setting; the workspace's datasets/ by default) are the server
folders that the app offers for import from the browser.

    python -m engine.data.sources import --kind aptos --path data/aptos --role train
    python -m engine.data.sources roots [--set DIR [DIR ...]]
"""

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from sqlalchemy import select

from cli import HelpFormatter, setup_logging
from db.queries import unused_name
from db.schema import Image, Source
from db.session import migrate, read_scope, session_scope
from db.settings import read_setting, write_setting
from engine.data.groups import group_of
from engine.data.images import IMAGE_SUFFIXES, ImageError, probe_image
from engine.runtime.jobs import JobReporter
from engine.runtime.workspace import Workspace
from grades import from_aptos

log = logging.getLogger(__name__)

ROLES = ("train", "validation", "unlabelled")
# Only unlabelled pools take role unlabelled: a plain folder, or the APTOS test split.
KIND_ROLES = {
    "aptos": ROLES,
    "messidor": ("train", "validation"),
    "folders": ("train", "validation"),
    "unlabelled": ("unlabelled",),
}
KINDS = tuple(KIND_ROLES)
DATA_ROOTS_KEY = "data_roots"
ANNOTATION_SUFFIXES = (".csv", ".xls", ".xlsx")
Progress = Callable[[int, int], None]


class ImportStopped(Exception):
    """The source as a whole cannot be read (missing folder or column); nothing was imported."""


@dataclass
class Entry:
    """One image a source lists, before it is checked."""

    where: str  # how the user finds it: "train.csv line 7" or a file path
    path: str  # relative to the source root
    name: str
    grade: int | None = None
    original_label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class ImportReport:
    source: str
    listed: int = 0
    added: int = 0
    already: int = 0
    problems: list[Problem] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"{self.source}: {self.listed} listed, {self.added} imported, "
            f"{self.already} already present, {len(self.problems)} skipped"
        ]
        lines += [f"  skipped {problem}" for problem in self.problems]
        return "\n".join(lines)


# Listing: each kind turns its files into entries and row-level problems.


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    else:
        engine = "xlrd" if path.suffix.lower() == ".xls" else "openpyxl"
        with warnings.catch_warnings():  # pandas marks xlrd deprecated; it still reads .xls
            warnings.simplefilter("ignore")
            table = pd.read_excel(path, dtype=str, keep_default_na=False, engine=engine)
    # The original Messidor spreadsheets carry a trailing space in a column name.
    return table.rename(columns=lambda c: str(c).strip())


def _require(table: pd.DataFrame, path: Path, *names: str) -> None:
    missing = [name for name in names if name not in table.columns]
    if missing:
        raise ImportStopped(
            f"{path}: missing required column {', '.join(repr(m) for m in missing)} "
            f"(found {', '.join(repr(c) for c in table.columns)})"
        )


def _parse_int(text: str, allowed: range, what: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a number") from None
    if value not in allowed:
        raise ValueError(f"{what} {value} is out of range {allowed.start}-{allowed.stop - 1}")
    return value


def _group_extra(name: str, row: dict | None = None) -> dict[str, str]:
    group = group_of(name, row)
    return {} if group is None else {"group": group}


def _list_aptos(root: Path, role: str) -> tuple[list[Entry], list[Problem]]:
    split = "test" if role == "unlabelled" else "train"
    csv = root / f"{split}.csv"
    if not csv.is_file():
        raise ImportStopped(f"{csv}: file not found (an APTOS folder holds {split}.csv)")
    table = _read_table(csv)
    _require(table, csv, "id_code", *(["diagnosis"] if split == "train" else []))
    entries, problems = [], []
    for line, row in zip(range(2, len(table) + 2), table.to_dict("records"), strict=True):
        where = f"{csv.name} line {line}"
        id_code = row["id_code"].strip()
        if not id_code:
            problems.append(Problem(where, "empty id_code"))
            continue
        entry = Entry(
            f"{where} (id_code {id_code})",
            f"{split}_images/{id_code}.png",
            id_code,
            extra=_group_extra(id_code, row),
        )
        if split == "train":
            try:
                diagnosis = _parse_int(row["diagnosis"], range(5), "diagnosis")
            except ValueError as exc:
                problems.append(Problem(entry.where, f"grade {exc}"))
                continue
            entry.grade, entry.original_label = from_aptos(diagnosis), str(diagnosis)
        entries.append(entry)
    return entries, problems


def _messidor_columns(table: pd.DataFrame, path: Path) -> tuple[str, str, str]:
    """(image, grade, edema) column names of either the seed's CSV or the original sheets."""
    if "image" in table.columns:
        names = ("image", "Retinopathy_grade", "Risk_of_macular_edema")
    else:
        names = ("Image name", "Retinopathy grade", "Risk of macular edema")
    _require(table, path, *names)
    return names


def _list_messidor_file(path: Path, root: Path) -> tuple[list[Entry], list[Problem]]:
    table = _read_table(path)
    image_col, grade_col, edema_col = _messidor_columns(table, path)
    prefix = path.parent.relative_to(root)
    entries, problems = [], []
    for line, row in zip(range(2, len(table) + 2), table.to_dict("records"), strict=True):
        name = row[image_col].strip()
        where = f"{path.name} line {line} ({name or 'no image name'})"
        if not name:
            problems.append(Problem(where, "empty image name"))
            continue
        try:
            grade = _parse_int(row[grade_col], range(4), "grade")
            edema = _parse_int(row[edema_col], range(3), "macular edema risk")
        except ValueError as exc:
            problems.append(Problem(where, str(exc)))
            continue
        rel = (prefix / name).as_posix()
        entries.append(
            Entry(
                where,
                rel,
                name,
                grade,
                str(grade),
                {"macular_edema": edema, **_group_extra(Path(name).stem, row)},
            )
        )
    return entries, problems


def _list_messidor(path: Path) -> tuple[Path, list[Entry], list[Problem]]:
    root = path if path.is_dir() else path.parent
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in root.iterdir() if p.suffix.lower() in ANNOTATION_SUFFIXES)
    )
    if not files:
        raise ImportStopped(f"{path}: no annotation file (.csv, .xls, .xlsx) in this folder")
    entries, problems = [], []
    for file in files:
        more, trouble = _list_messidor_file(file, root)
        entries += more
        problems += trouble
    return root, entries, problems


def _visible_files(folder: Path) -> list[Path]:
    """Files and links to files; a broken link too, so that the report names it."""
    return sorted(
        p
        for p in folder.rglob("*")
        if not p.name.startswith(".") and (p.is_file() or p.is_symlink() and not p.exists())
    )


def _list_folders(root: Path) -> tuple[list[Entry], list[Problem]]:
    entries, problems = [], []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        if folder.name not in ("0", "1", "2", "3"):
            problems.append(Problem(f"{folder.name}/", "folder name is not a grade 0-3"))
            continue
        for file in _visible_files(folder):
            rel = file.relative_to(root).as_posix()
            entries.append(Entry(rel, rel, file.stem, int(folder.name), folder.name, _group_extra(file.stem)))
    if not folders:
        raise ImportStopped(f"{root}: no class folders 0/ 1/ 2/ 3/ in this folder")
    return entries, problems


def _list_unlabelled(root: Path) -> tuple[list[Entry], list[Problem]]:
    entries = []
    for file in _visible_files(root):
        rel = file.relative_to(root).as_posix()
        entries.append(Entry(rel, rel, file.stem, extra=_group_extra(file.stem)))
    return entries, []


def list_source(kind: str, path: Path, role: str) -> tuple[Path, list[Entry], list[Problem]]:
    """The source's root folder, its entries and the rows that could not be read."""
    if kind not in KINDS:
        raise ImportStopped(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if role not in ROLES:
        raise ImportStopped(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if role not in KIND_ROLES[kind]:
        raise ImportStopped(
            f"kind {kind} cannot take role {role} (it takes "
            f"{', '.join(KIND_ROLES[kind])}): only unlabelled pools "
            "(kind unlabelled, or APTOS test) take role unlabelled"
        )
    if not path.exists() or (kind != "messidor" and not path.is_dir()):
        raise ImportStopped(f"{path}: folder not found")
    path = path.resolve()
    if kind == "messidor":
        return _list_messidor(path)
    if kind == "aptos":
        return path, *_list_aptos(path, role)
    if kind == "folders":
        return path, *_list_folders(path)
    return path, *_list_unlabelled(path)


# Checking: paths stay inside the root, ids are unique, files are whole images.


def stays_inside(path: str) -> bool:
    """Whether a relative path names a place under its root by its words alone: not absolute,
    no '..'. Links under the root are followed wherever they point, as training does: a folder
    of links is a common way to make class folders without copying the photographs."""
    pure = PurePosixPath(path)
    return not pure.is_absolute() and ".." not in pure.parts


def _check_paths(entries: list[Entry]) -> tuple[list[Entry], list[Problem]]:
    kept: list[Entry] = []
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}  # name -> where
    for entry in entries:
        if not stays_inside(entry.path):
            problems.append(Problem(entry.where, f"path {entry.path!r} escapes the source root"))
        elif entry.name in first_seen:
            problems.append(
                Problem(entry.where, f"duplicate id {entry.name!r} (first at {first_seen[entry.name]})")
            )
        else:
            first_seen[entry.name] = entry.where
            kept.append(entry)
    return kept, problems


def _probe(root: Path, entry: Entry) -> tuple[int, int] | str:
    if Path(entry.path).suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({Path(entry.path).suffix or 'no extension'})"
    file = root / entry.path
    if file.is_symlink() and not file.exists():
        return f"broken link to {os.readlink(file)}"
    try:
        return probe_image(file)
    except ImageError as exc:
        return str(exc)


def _probe_all(
    root: Path, entries: list[Entry], progress: Progress | None
) -> tuple[list[tuple[Entry, tuple[int, int]]], list[Problem]]:
    good, problems = [], []
    # Decoding releases the GIL, so threads use every core without pickling entries.
    with ThreadPoolExecutor() as pool:
        results = pool.map(lambda e: _probe(root, e), entries)
        try:
            for done, (entry, result) in enumerate(zip(entries, results, strict=True), start=1):
                if isinstance(result, str):
                    problems.append(Problem(entry.where, result))
                else:
                    good.append((entry, result))
                if progress and (done % 25 == 0 or done == len(entries)):
                    progress(done, len(entries))
        finally:
            # A cancel (raised by progress) drops the probes not started yet.
            pool.shutdown(cancel_futures=True)
    return good, problems


# Storing.


def _find_source(session, kind: str, root: Path, role: str) -> Source | None:
    """The source imported from `root` in `role` before; a folder imported in the other
    labelled role is refused."""
    source = session.scalar(select(Source).filter_by(kind=kind, root=str(root), role=role))
    other = session.scalar(
        select(Source).where(Source.root == str(root), Source.role != role, Source.role != "unlabelled")
    )
    if source is None and other is not None and role != "unlabelled":
        raise ImportStopped(
            f"{root} is imported already as {other.name!r} with role "
            f"{other.role}: one folder cannot be both training and validation, "
            "or the validation figures would judge images the model learned"
        )
    return source


def _get_source(session, kind: str, root: Path, role: str, name: str | None) -> Source:
    source = _find_source(session, kind, root, role)
    if source is None:
        name = unused_name(session, Source.name, name or f"{root.name}-{role}")
        source = Source(kind=kind, root=str(root), role=role, name=name)
        session.add(source)
        session.flush()
    return source


def import_source(
    db_url: str, kind: str, path: Path, role: str, name: str | None = None, progress: Progress | None = None
) -> ImportReport:
    """Import one dataset into the database; raises ImportStopped if it cannot be read at all.
    Nothing is written before every new file is checked: a cancel leaves no trace."""
    root, entries, problems = list_source(kind, Path(path), role)
    entries, bad_paths = _check_paths(entries)
    with read_scope(db_url) as session:
        source = _find_source(session, kind, root, role)
        known = (
            set()
            if source is None
            else set(session.scalars(select(Image.path).where(Image.source_id == source.id)))
        )
    new = [e for e in entries if e.path not in known]
    good, unreadable = _probe_all(root, new, progress)
    labelled = role != "unlabelled"
    with session_scope(db_url) as session:
        source = _get_source(session, kind, root, role, name)
        report = ImportReport(
            source.name,
            listed=len(entries) + len(problems) + len(bad_paths),
            added=len(good),
            already=len(entries) - len(new),
            problems=problems + bad_paths + unreadable,
        )
        session.add_all(
            Image(
                source_id=source.id,
                path=e.path,
                name=e.name,
                width=w,
                height=h,
                grade=e.grade if labelled else None,
                original_label=e.original_label,
                label_origin="expert" if labelled and e.grade is not None else None,
                extra=e.extra,
            )
            for e, (w, h) in good
        )
        source.report = report.to_dict()
    return report


# Where the app may import from.


def data_roots(workspace: Workspace) -> list[Path]:
    """The server folders offered for import in the browser; the workspace's datasets/
    until an administrator names others."""
    value = read_setting(workspace.db_url, DATA_ROOTS_KEY)
    return [Path(root) for root in value["roots"]] if value else [workspace.datasets]


def set_data_roots(workspace: Workspace, roots: list[Path]) -> list[Path]:
    missing = [str(root) for root in roots if not root.is_dir()]
    if missing:
        raise ImportStopped(f"{', '.join(missing)}: folder not found")
    roots = [root.resolve() for root in roots]
    write_setting(workspace.db_url, DATA_ROOTS_KEY, {"roots": [str(root) for root in roots]})
    return roots


def _subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return sorted(Path(e.path) for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError:  # unreadable to the server: nothing to offer from it
        return []


def folder_choices(roots: list[Path], depth: int = 3, limit: int = 2000) -> list[Path]:
    """The roots and their subfolders down to `depth` levels (hidden ones left out), in
    order, at most `limit`: the only folders the browser can choose."""
    found, level = [], [root for root in roots if root.is_dir()]
    for _ in range(depth + 1):
        found += level
        if len(found) >= limit:
            break
        level = [sub for folder in level for sub in _subfolders(folder)]
    return sorted(dict.fromkeys(found))[:limit]


def _import_command(args: argparse.Namespace, workspace: Workspace) -> int:
    report = None
    try:
        # The app's import job reports here; a cancel leaves the source as it was.
        with JobReporter(workspace.db_url, args.job_id) as job:

            def checked(done: int, total: int) -> None:
                job.progress(done / total, f"checking images: {done}/{total}")

            report = import_source(workspace.db_url, args.kind, args.path, args.role, args.name, checked)
    except ImportStopped as exc:
        log.error("import stopped: %s", exc)
        return 2
    if report is None:
        log.warning("import cancelled: nothing was added")
        return 1
    print(report)
    return 0


def _roots_command(args: argparse.Namespace, workspace: Workspace) -> int:
    if args.set:
        try:
            set_data_roots(workspace, args.set)
        except ImportStopped as exc:
            log.error("%s", exc)
            return 2
    print("\n".join(str(root) for root in data_roots(workspace)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.data.sources", description=__doc__, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser(
        "import", formatter_class=HelpFormatter, help="import one dataset into the workspace"
    )
    imp.add_argument("--kind", required=True, choices=KINDS, help="the dataset's layout")
    imp.add_argument("--path", required=True, type=Path, help="the dataset's folder")
    imp.add_argument("--role", required=True, choices=ROLES, help="what the app does with its images")
    imp.add_argument("--name", help="name shown in the app (default: folder-role)")
    imp.add_argument("--job-id", type=int, help="report to this job row (set by the app)")
    roots = commands.add_parser(
        "roots", formatter_class=HelpFormatter, help="show, or --set, the folders the app may import from"
    )
    roots.add_argument(
        "--set",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="the folders the Dataset page may import from (default: show them)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    workspace = Workspace.from_env()
    migrate(workspace.db_url)
    command = _import_command if args.command == "import" else _roots_command
    return command(args, workspace)


if __name__ == "__main__":
    sys.exit(main())
