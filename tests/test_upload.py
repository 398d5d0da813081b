"""Unpacking an uploaded zip: a dataset lands in a folder of its own, the same zip again lands
in the same folder, and a zip that escapes, links or is too large writes nothing."""

import io
import stat
import zipfile
from pathlib import Path

import pytest
from conftest import write_image

from db.users import TERMINAL
from engine.data.sources import import_source
from engine.data.upload import UnsafeUpload, unpack_zip

# These tests are about the zip, not about who may upload it (test_roles.py is): they unpack
# as the terminal, which opens no database.
AS_TERMINAL = {"db_url": None, "user": TERMINAL}


def zip_of(entries: dict[str, bytes], links: dict[str, str] | None = None) -> io.BytesIO:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3  # Unix: the high word of external_attr is st_mode
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    data.seek(0)
    return data


def aptos_zip(tmp_path: Path) -> io.BytesIO:
    """An APTOS train set zipped as a folder ("aptos/..."), with macOS's resource forks."""
    png = write_image(tmp_path / "one.png").read_bytes()
    return zip_of(
        {
            "aptos/train.csv": b"id_code,diagnosis\na1,0\na2,4\nmissing,1\n",
            "aptos/train_images/a1.png": png,
            "aptos/train_images/a2.png": png,
            "__MACOSX/aptos/._train.csv": b"junk",
        }
    )


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_zip_unpacks_into_its_own_folder_and_reimport_changes_nothing(tmp_path, db_url):
    into = tmp_path / "uploads"
    root = unpack_zip(aptos_zip(tmp_path), "../../APTOS train.zip", into, **AS_TERMINAL)
    assert root.parent.parent == into and root.name == "aptos"
    assert root.parent.name.startswith("APTOS_train-")  # the name cleaned, no path from it
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "train.csv",
        "train_images",
        "train_images/a1.png",
        "train_images/a2.png",
    ]
    report = import_source(db_url, "aptos", root, "train", "upload")
    assert (report.added, [p.reason for p in report.problems]) == (2, ["missing file"])

    (root / "train_images" / "a1.png").unlink()  # proves the second upload unpacks nothing
    assert unpack_zip(aptos_zip(tmp_path), "APTOS train.zip", into, **AS_TERMINAL) == root
    assert visible(into) == [root.parent.name]
    again = import_source(db_url, "aptos", root, "train", "upload")
    assert (again.added, again.already) == (0, 2)


@pytest.mark.parametrize(
    "entries, links, rule",
    [
        ({"ok.png": b"x", "../evil.png": b"x"}, None, "'../evil.png' points outside"),
        ({"data/../../evil.png": b"x"}, None, "points outside"),
        ({"/etc/evil.png": b"x"}, None, "'/etc/evil.png' points outside"),
        ({"..\\evil.png": b"x"}, None, "points outside"),
        ({"ok.png": b"x"}, {"data/0/link.png": "/etc/passwd"}, "'data/0/link.png' is a symbolic link"),
        ({"a.png": b"x", "b/a.png": b"y", "a.png ": b"z"}, None, None),
    ],
)
def test_unsafe_entries_are_refused_and_nothing_is_written(tmp_path, entries, links, rule):
    into = tmp_path / "uploads"
    if rule is None:  # the control: the same shape of zip without the offending entry
        assert unpack_zip(zip_of(entries, links), "fine.zip", into, **AS_TERMINAL).is_dir()
        return
    with pytest.raises(UnsafeUpload, match=rule.replace("\\", "\\\\")):
        unpack_zip(zip_of(entries, links), "bad.zip", into, **AS_TERMINAL)
    assert visible(into) == []
    assert not (tmp_path / "evil.png").exists()


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_name_twice_is_refused(tmp_path):
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("0/a.png", b"first")
        archive.writestr("0/a.png", b"second")
    with pytest.raises(UnsafeUpload, match="'0/a.png' appears twice"):
        unpack_zip(data, "twice.zip", tmp_path / "uploads", **AS_TERMINAL)


def test_size_and_count_limits_are_stated(tmp_path):
    into = tmp_path / "uploads"
    big = zip_of({"a.png": b"\0" * 3_000_000, "b.png": b"\0" * 2_000_000})  # compresses to KBs
    assert len(big.getvalue()) < 50_000
    with pytest.raises(UnsafeUpload, match=r"unpacks to 4\.8 MB, more than the limit of 4\.0 MB"):
        unpack_zip(big, "bomb.zip", into, max_bytes=4 * 1024**2, **AS_TERMINAL)
    many = zip_of({f"{i}.png": b"x" for i in range(5)})
    with pytest.raises(UnsafeUpload, match="holds 5 files, more than the limit of 4"):
        unpack_zip(many, "many.zip", into, max_files=4, **AS_TERMINAL)
    assert visible(into) == []
    assert unpack_zip(many, "many.zip", into, max_files=5, **AS_TERMINAL).is_dir()


def test_not_a_zip_and_empty_zip_are_refused_in_words(tmp_path):
    with pytest.raises(UnsafeUpload, match="notes.zip is not a readable zip file"):
        unpack_zip(io.BytesIO(b"hello"), "notes.zip", tmp_path, **AS_TERMINAL)
    with pytest.raises(UnsafeUpload, match="holds no files"):
        unpack_zip(zip_of({"__MACOSX/._x": b"junk"}), "empty.zip", tmp_path, **AS_TERMINAL)
