"""Unpacking an uploaded dataset (a zip of images with its CSV) safely into the workspace.

Every entry is checked before anything is written: no absolute names, no '..', no symbolic
links or other special files, no encrypted entries, no name twice, and limits on the file
count and the unpacked size (a small zip can unpack to terabytes). The same zip uploaded
again lands in the same folder, so importing it again changes nothing.
"""

import hashlib
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from db.users import User, require_admin
from engine.data.sources import stays_inside

MAX_UNPACKED_BYTES = 2 * 1024**3
MAX_FILES = 20_000
JUNK = ("__MACOSX/",)  # resource forks that macOS's Archive Utility adds


class UnsafeUpload(ValueError):
    """The zip cannot be unpacked as it is; the message names the entry and the rule."""


def _size(n: int) -> str:
    return f"{n / 1024**3:.1f} GB" if n >= 1024**3 else f"{n / 1024**2:.1f} MB"


def _is_plain(info: zipfile.ZipInfo) -> bool:
    """A file or folder; Unix permission bits (the high word) may mark a link or a device."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    return kind in (0, stat.S_IFREG, stat.S_IFDIR)


def checked_members(
    archive: zipfile.ZipFile, max_bytes: int = MAX_UNPACKED_BYTES, max_files: int = MAX_FILES
) -> list[tuple[zipfile.ZipInfo, str]]:
    """(entry, relative path) of every file to unpack; raises UnsafeUpload on the first
    entry that breaks a rule, or when the whole exceeds a limit."""
    members, seen = [], set()
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        if name.startswith(JUNK):
            continue
        if not stays_inside(name):
            raise UnsafeUpload(
                f"{info.filename!r} points outside the upload's folder (absolute name or '..')"
            )
        if not _is_plain(info):
            raise UnsafeUpload(
                f"{info.filename!r} is a symbolic link or special file; zip the files themselves"
            )
        if info.flag_bits & 0x1:
            raise UnsafeUpload(f"{info.filename!r} is encrypted")
        if info.is_dir():
            continue
        path = PurePosixPath(name).as_posix()
        if path in seen:
            raise UnsafeUpload(f"{info.filename!r} appears twice in the zip")
        seen.add(path)
        members.append((info, path))
    if not members:
        raise UnsafeUpload("the zip holds no files")
    if len(members) > max_files:
        raise UnsafeUpload(f"the zip holds {len(members)} files, more than the limit of {max_files}")
    total = sum(info.file_size for info, _ in members)
    if total > max_bytes:
        raise UnsafeUpload(f"the zip unpacks to {_size(total)}, more than the limit of {_size(max_bytes)}")
    return members


def _content_root(folder: Path) -> Path:
    """The one folder a zip of a folder wraps everything in, or `folder` itself."""
    inside = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return inside[0] if len(inside) == 1 and inside[0].is_dir() else folder


def _folder_name(filename: str, data: BinaryIO) -> str:
    """The upload's name, cleaned, and the start of its content's SHA-256."""
    digest = hashlib.sha256()
    data.seek(0)
    while chunk := data.read(1 << 20):
        digest.update(chunk)
    data.seek(0)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(filename).stem).strip("_") or "upload"
    return f"{stem[:60]}-{digest.hexdigest()[:12]}"


def unpack_zip(
    data: BinaryIO,
    filename: str,
    into: Path,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_files: int = MAX_FILES,
    *,
    db_url: str,
    user: User | None,
) -> Path:
    """Unpack an uploaded zip into a folder of its own under `into`, named for the upload and
    its content; return the dataset's folder in it. Nothing is left behind when it fails.
    Only an admin (as `db_url` says now) or db.users.TERMINAL fills the server's disk so
    (NotAllowed otherwise)."""
    require_admin(db_url, user, "upload a dataset")
    target = into / _folder_name(filename, data)
    if target.is_dir():  # the same zip again
        return _content_root(target)
    partial = into / f".{target.name}.partial"  # hidden: never offered for import
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted upload left
    try:
        with zipfile.ZipFile(data) as archive:
            # zipfile stops every entry at its declared size, so the checked sizes bound
            # what is written.
            for info, path in checked_members(archive, max_bytes, max_files):
                out = partial / path
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        partial.rename(target)
    except zipfile.BadZipFile as exc:
        raise UnsafeUpload(f"{filename} is not a readable zip file ({exc})") from None
    except OSError as exc:
        raise UnsafeUpload(f"{filename} could not be unpacked: {exc}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return _content_root(target)
