"""Importers: good rows land, each bad row is reported with its reason, re-import is a no-op."""

import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import xlwt
from conftest import ROOT, write_image
from sqlalchemy import func, select

from db.schema import Image, Source
from db.session import session_scope
from engine.data.sources import ImportStopped, import_source


def images_of(db_url: str, source_name: str) -> dict[str, Image]:
    with session_scope(db_url) as session:
        rows = session.scalars(select(Image).join(Source).where(Source.name == source_name))
        return {image.name: image for image in rows}


def reasons(report) -> dict[str, str]:
    return {p.where: p.reason for p in report.problems}


def huge_png(path: Path, width: int = 9000, height: int = 9000) -> None:
    """A valid PNG header announcing an image far past the safe size (no pixels needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def aptos(tmp_path: Path) -> Path:
    root = tmp_path / "aptos"
    rows = [
        ("a1", "0"),
        ("a2", "1"),
        ("a3", "2"),
        ("a4", "3"),
        ("a5", "4"),
        ("missing", "1"),
        ("big", "2"),
        ("trunc", "0"),
        ("text", "1"),
        ("a6", "7"),
        ("a7", "two"),
        ("a1", "2"),
        ("../../escape", "1"),
    ]
    root.mkdir()
    pd.DataFrame(rows, columns=["id_code", "diagnosis"]).to_csv(root / "train.csv", index=False)
    for name in ("a1", "a2", "a3", "a4", "a5", "a6", "a7"):
        write_image(root / "train_images" / f"{name}.png")
    huge_png(root / "train_images" / "big.png")
    good = (root / "train_images" / "a1.png").read_bytes()
    (root / "train_images" / "trunc.png").write_bytes(good[: len(good) // 2])
    (root / "train_images" / "text.png").write_text("not an image at all")
    write_image(tmp_path / "escape.png")
    pd.DataFrame({"id_code": ["t1", "t2"]}).to_csv(root / "test.csv", index=False)
    for name in ("t1", "t2"):
        write_image(root / "test_images" / f"{name}.png")
    return root


def test_aptos_train_imports_good_rows_and_reports_each_bad_one(aptos, db_url):
    report = import_source(db_url, "aptos", aptos, "train", name="aptos-train")
    images = images_of(db_url, "aptos-train")
    assert sorted(images) == ["a1", "a2", "a3", "a4", "a5"]
    # ICDR 4 (proliferative) merges into Messidor 3; the original label is kept.
    assert {n: (i.grade, i.original_label) for n, i in images.items()} == {
        "a1": (0, "0"),
        "a2": (1, "1"),
        "a3": (2, "2"),
        "a4": (3, "3"),
        "a5": (3, "4"),
    }
    assert all(i.label_origin == "expert" and i.width == 64 for i in images.values())
    why = reasons(report)
    assert why["train.csv line 7 (id_code missing)"] == "missing file"
    assert "too large to decode safely" in why["train.csv line 8 (id_code big)"]
    assert why["train.csv line 9 (id_code trunc)"] == "truncated image"
    assert "unreadable or not an image" in why["train.csv line 10 (id_code text)"]
    assert "out of range" in why["train.csv line 11 (id_code a6)"]
    assert "not a number" in why["train.csv line 12 (id_code a7)"]
    assert "duplicate id 'a1'" in why["train.csv line 13 (id_code a1)"]
    assert "escapes the source root" in why["train.csv line 14 (id_code ../../escape)"]
    assert (report.listed, report.added, len(report.problems)) == (13, 5, 8)


def test_reimport_changes_nothing(aptos, db_url):
    import_source(db_url, "aptos", aptos, "train")
    before = {n: (i.id, i.grade) for n, i in images_of(db_url, "aptos-train").items()}
    again = import_source(db_url, "aptos", aptos, "train")
    assert (again.added, again.already) == (0, 5)
    assert {n: (i.id, i.grade) for n, i in images_of(db_url, "aptos-train").items()} == before
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count()).select_from(Source)) == 1


def test_aptos_test_set_is_an_unlabelled_pool(aptos, db_url):
    report = import_source(db_url, "aptos", aptos, "unlabelled", name="pool")
    images = images_of(db_url, "pool")
    assert report.added == 2 and sorted(images) == ["t1", "t2"]
    assert all(i.grade is None and i.path.startswith("test_images/") for i in images.values())


def write_messidor(folder: Path, form: str) -> None:
    for name in ("m1.tif", "m2.tif", "m3.tif"):
        write_image(folder / name)
    rows = [("m1.tif", 0, 0), ("m2.tif", 3, 2), ("m3.tif", 5, 0), ("gone.tif", 1, 1)]
    if form == "seed":
        table = pd.DataFrame(
            [(n, 1, "PP", g, e) for n, g, e in rows],
            columns=["image", "quality", "type", "Retinopathy_grade", "Risk_of_macular_edema"],
        )
        table.to_csv(folder / "Mess1_annotation_train.csv")  # with the leading index column
        return
    columns = ["Image name", "Ophthalmologic department", "Retinopathy grade", "Risk of macular edema "]
    table = [(n, "Service", g, e) for n, g, e in rows]
    if form == "csv":
        pd.DataFrame(table, columns=columns).to_csv(folder / "Annotation_Base11.csv", index=False)
        return
    book = xlwt.Workbook()
    sheet = book.add_sheet("Feuil1")
    for r, row in enumerate([columns, *table]):
        for c, value in enumerate(row):
            sheet.write(r, c, value)
    book.save(str(folder / "Annotation_Base11.xls"))


@pytest.mark.parametrize("form", ["seed", "csv", "xls"])
def test_messidor_forms(form, tmp_path, db_url):
    write_messidor(tmp_path / "messidor", form)
    report = import_source(db_url, "messidor", tmp_path / "messidor", "train", name="m")
    images = images_of(db_url, "m")
    assert {n: (i.grade, i.extra["macular_edema"]) for n, i in images.items()} == {
        "m1.tif": (0, 0),
        "m2.tif": (3, 2),
    }
    why = {p.where.split(" (")[1]: p.reason for p in report.problems}
    assert why == {"m3.tif)": "grade 5 is out of range 0-3", "gone.tif)": "missing file"}


def test_class_folders(tmp_path, db_url):
    for grade in "0123":
        write_image(tmp_path / "f" / grade / f"img{grade}.jpg")
    write_image(tmp_path / "f" / "7" / "x.png")
    (tmp_path / "f" / "2" / "notes.txt").write_text("hello")
    report = import_source(db_url, "folders", tmp_path / "f", "validation", name="val")
    images = images_of(db_url, "val")
    assert {n: i.grade for n, i in images.items()} == {f"img{g}": int(g) for g in "0123"}
    assert reasons(report) == {
        "7/": "folder name is not a grade 0-3",
        "2/notes.txt": "not an image file (.txt)",
    }


def test_unlabelled_folder(tmp_path, db_url):
    write_image(tmp_path / "pool" / "a.png")
    write_image(tmp_path / "pool" / "sub" / "b.tiff")
    import_source(db_url, "unlabelled", tmp_path / "pool", "unlabelled", name="pool")
    images = images_of(db_url, "pool")
    assert {i.path for i in images.values()} == {"a.png", "sub/b.tiff"}
    assert all(i.grade is None for i in images.values())


def test_whole_source_problems_stop_with_one_message(tmp_path, db_url):
    with pytest.raises(ImportStopped, match="folder not found"):
        import_source(db_url, "folders", tmp_path / "nowhere", "train")
    (tmp_path / "a").mkdir()
    pd.DataFrame({"id_code": ["x"]}).to_csv(tmp_path / "a" / "train.csv", index=False)
    with pytest.raises(ImportStopped, match="missing required column 'diagnosis'"):
        import_source(db_url, "aptos", tmp_path / "a", "train")
    with pytest.raises(ImportStopped, match="cannot take role unlabelled"):
        import_source(db_url, "folders", tmp_path / "a", "unlabelled")


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "DR_WORKSPACE": str(tmp_path / "ws")}
    return subprocess.run(
        [sys.executable, "-m", "engine.data.sources", "import", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_exit_codes(aptos, tmp_path):
    done = run_cli(tmp_path, "--kind", "aptos", "--path", str(aptos), "--role", "train")
    assert done.returncode == 0, done.stderr
    assert "5 imported" in done.stdout and "truncated image" in done.stdout
    missing = run_cli(tmp_path, "--kind", "aptos", "--path", str(tmp_path / "no"), "--role", "train")
    assert missing.returncode == 2 and "folder not found" in missing.stderr
    (aptos / "train.csv").write_text("image,grade\nx,1\n")
    column = run_cli(tmp_path, "--kind", "aptos", "--path", str(aptos), "--role", "train")
    assert column.returncode == 2 and "missing required column 'id_code'" in column.stderr


def linked_class_folders(tmp_path: Path) -> Path:
    """Class folders made of links to photographs kept elsewhere, as one makes them without
    copying: file links, a class folder that is itself a link, and one broken link."""
    photos = tmp_path / "photos"
    for name in ("a", "b", "c", "d"):
        write_image(photos / f"{name}.png")
    write_image(photos / "grade3" / "e.png")
    folders = tmp_path / "linked"
    for grade, name in (("0", "a"), ("0", "b"), ("1", "c"), ("2", "d")):
        (folders / grade).mkdir(parents=True, exist_ok=True)
        (folders / grade / f"{name}.png").symlink_to(photos / f"{name}.png")
    (folders / "3").symlink_to(photos / "grade3", target_is_directory=True)
    (folders / "1" / "gone.png").symlink_to(photos / "gone.png")
    return folders


def test_linked_class_folders_import_as_training_reads_them(tmp_path, db_url):
    from engine.data.datasets import folder_samples

    folders = linked_class_folders(tmp_path)
    report = import_source(db_url, "folders", folders, "train", name="linked")
    images = images_of(db_url, "linked")
    assert {n: i.grade for n, i in images.items()} == {"a": 0, "b": 0, "c": 1, "d": 2, "e": 3}
    assert reasons(report) == {"1/gone.png": f"broken link to {tmp_path / 'photos' / 'gone.png'}"}
    # Training on the same folder (engine.training.train --data-path) reads the same photographs.
    trained = {s.name: s.grade for s in folder_samples(folders) if Path(s.path).exists()}
    assert trained == {n: i.grade for n, i in images.items()}


def test_inference_on_a_folder_of_links_predicts_every_image(tmp_path, monkeypatch, capsys):
    from conftest import tiny_checkpoint

    from engine.model import infer
    from engine.runtime import jobs

    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("p1", "p2", "p3"):
        (pool / f"{name}.png").symlink_to(write_image(tmp_path / "photos" / f"{name}.png"))
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pth")
    assert (
        infer.main(
            [
                "--checkpoint",
                str(checkpoint),
                "--images",
                str(pool),
                "--workers",
                "0",
                "--out",
                str(tmp_path / "s.csv"),
            ]
        )
        == 0
    )
    out, said = capsys.readouterr()
    assert "3 imported" in said and "3 predicted, 0 skipped" in out
    assert sorted(pd.read_csv(tmp_path / "s.csv").id_code) == ["p1", "p2", "p3"]


def test_a_listed_path_with_dots_is_refused_even_through_a_link(tmp_path, db_url):
    root = tmp_path / "aptos"
    write_image(root / "train_images" / "ok.png")
    write_image(tmp_path / "outside" / "x.png")
    (root / "train_images" / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    pd.DataFrame({"id_code": ["ok", "sub/x", "sub/../../../outside/x"], "diagnosis": [0, 1, 2]}).to_csv(
        root / "train.csv", index=False
    )
    report = import_source(db_url, "aptos", root, "train", name="t")
    assert sorted(images_of(db_url, "t")) == ["ok", "sub/x"]  # a link inside is followed
    assert list(reasons(report).values()) == [
        "path 'train_images/sub/../../../outside/x.png' escapes the source root"
    ]


def test_data_roots_bound_the_folders_offered(tmp_path, workspace, capsys):
    from engine.data.sources import data_roots, folder_choices, main, set_data_roots

    assert data_roots(workspace) == [workspace.datasets]
    for folder in ("a/0", "a/1", "b/x/y/z/deep", ".hidden/0"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    (tmp_path / "other").mkdir()
    assert set_data_roots(workspace, [tmp_path / "data", tmp_path / "other"]) == [
        tmp_path / "data",
        tmp_path / "other",
    ]
    assert data_roots(workspace) == [tmp_path / "data", tmp_path / "other"]  # stored
    offered = [p.relative_to(tmp_path).as_posix() for p in folder_choices(data_roots(workspace))]
    assert offered == [
        "data",
        "data/a",
        "data/a/0",
        "data/a/1",
        "data/b",
        "data/b/x",
        "data/b/x/y",
        "other",
    ]  # three levels down, hidden folders left out
    with pytest.raises(ImportStopped, match="nowhere: folder not found"):
        set_data_roots(workspace, [tmp_path / "nowhere"])
    assert main(["roots", "--set", str(tmp_path / "other")]) == 0  # the administrator's way
    assert capsys.readouterr().out == f"{tmp_path / 'other'}\n"
    assert main(["roots", "--set", str(tmp_path / "nowhere")]) == 2
    assert data_roots(workspace) == [tmp_path / "other"]


def test_the_import_job_reports_progress_and_outcome(aptos, workspace, monkeypatch, capsys):
    from db.schema import Job
    from engine.data import sources
    from engine.runtime import jobs

    monkeypatch.setattr(jobs.signal, "signal", lambda *args: None)  # pytest keeps its SIGTERM

    def import_job(path: Path, status: str = "queued") -> tuple[int, list[str]]:
        with session_scope(workspace.db_url) as session:
            job = Job(kind="import", params={}, status=status)
            session.add(job)
            session.flush()
            job_id = job.id
        argv = ["import", "--kind", "aptos", "--path", str(path), "--role", "train", "--job-id", str(job_id)]
        return job_id, argv

    job_id, argv = import_job(aptos, status="cancelled")  # cancelled while starting
    assert sources.main(argv) == 1
    assert "import cancelled: nothing was added" in capsys.readouterr().err
    with session_scope(workspace.db_url) as session:
        assert session.get(Job, job_id).status == "cancelled"
        assert session.scalar(select(func.count()).select_from(Source)) == 0  # no trace

    job_id, argv = import_job(aptos)
    assert sources.main(argv) == 0
    with session_scope(workspace.db_url) as session:
        job = session.get(Job, job_id)
        assert (job.status, job.progress, job.message) == ("done", 1.0, "checking images: 9/9")
        report = session.scalar(select(Source)).report
    assert report["added"] == 5 and len(report["problems"]) == 8
    assert "5 imported" in capsys.readouterr().out

    job_id, argv = import_job(aptos.parent / "nowhere")
    assert sources.main(argv) == 2
    with session_scope(workspace.db_url) as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and "nowhere: folder not found" in job.error
