"""The app shell and the Dataset page, run headless with Streamlit's AppTest."""

import io
import zipfile
from pathlib import Path

from conftest import open_page, page_text, wait_for_job, write_image
from sqlalchemy import select

from db.queries import sources_frame
from db.schema import Job
from db.session import session_scope
from db.users import LOCAL
from engine.data.sources import import_source
from engine.loop.demo import demo_args
from engine.runtime import jobs
from engine.runtime.markdown import literal


def test_empty_workspace_shows_a_sentence(workspace):
    at = open_page()
    assert at.title[0].value == "Dataset"
    assert "No datasets yet" in page_text(at)
    assert str(workspace.root) in page_text(at)  # the sidebar names the workspace
    assert "Device: CPU (" in page_text(at)  # and the device


def test_first_start_launches_the_demo_job(workspace, monkeypatch):
    monkeypatch.setenv("DR_DEMO", "1")
    at = open_page()
    job = jobs.latest_job(workspace.db_url, "demo")
    try:
        assert job is not None and job.status in jobs.ACTIVE
        assert "Building the demo workspace" in page_text(at)
        open_page()  # a second browser session does not start a second build
        with session_scope(workspace.db_url) as session:
            assert len(session.scalars(select(Job)).all()) == 1
    finally:
        jobs.cancel_job(workspace.db_url, job.id, user=LOCAL)


def test_a_smaller_demo_takes_its_counts_and_a_bad_setting_is_an_error(workspace, monkeypatch):
    assert demo_args("60") == ["--train", "60", "--test", "30", "--val", "15"]
    monkeypatch.setenv("DR_DEMO", "lots")
    at = open_page()
    assert literal(
        "DR_DEMO is 0 (no demo), 1 (the demo) or a number of training photographs of at least 8, not 'lots'"
    ) in page_text(at)
    assert jobs.latest_job(workspace.db_url, "demo") is None
    monkeypatch.setenv("DR_DEMO", "12")
    open_page()
    job = wait_for_job(
        workspace, jobs.latest_job(workspace.db_url, "demo").id, lambda j: j.status not in jobs.ACTIVE
    )
    assert job.status == "done", jobs.log_tail(job.log_path)
    frame = sources_frame(workspace.db_url)
    assert dict(zip(frame["name"], frame["images"], strict=True)) == {
        "demo APTOS train": 12,
        "demo APTOS test": 6,
        "demo high-quality validation": 4,
    }


def test_dataset_page_shows_balance_reports_and_gallery(workspace, tmp_path):
    for grade, count in ((0, 3), (1, 1), (2, 2), (3, 1)):
        for i in range(count):
            write_image(tmp_path / "train" / str(grade) / f"g{grade}_{i}.png", (80, 60))
    (tmp_path / "train" / "0" / "broken.png").write_text("oops")
    write_image(tmp_path / "pool" / "p.png")
    import_source(workspace.db_url, "folders", tmp_path / "train", "train", "curated")
    import_source(workspace.db_url, "unlabelled", tmp_path / "pool", "unlabelled", "pool")

    at = open_page()
    assert len(at.get("plotly_chart")) == 1  # one role with labels: train
    assert [m.value for m in at.main.metric] == ["3.0×"]  # 3 images of grade 0 over 1 of grade 1
    overview = {m.label: m.value for m in at.sidebar.metric}
    assert overview == {"Labelled": "7", "Runs": "0", "Predicted": "0", "Candidates": "0", "Reviewed": "0"}
    reports = [e.label for e in at.expander]
    assert any("curated: 7 imported" in r and "1 skipped" in r for r in reports)
    assert "unreadable or not an image" in page_text(at)
    assert len(at.image) == 8  # a page of four photographs, each beside its preprocessed view

    at.selectbox(key="gallery_source").select("pool").run()
    assert not at.exception and len(at.image) == 2
    at.selectbox(key="gallery_grade").select(3).run()
    assert "pool has no images of this grade" in page_text(at)


def class_folders(root: Path) -> Path:
    for grade in "0123":
        write_image(root / grade / f"img{grade}.png")
    (root / "1" / "broken.png").write_text("oops")
    return root


def import_jobs(workspace) -> list[Job]:
    with session_scope(workspace.db_url) as session:
        return list(session.scalars(select(Job).where(Job.kind == "import").order_by(Job.id)))


def test_import_a_folder_chosen_under_the_data_roots(workspace, tmp_path):
    folder = class_folders(workspace.datasets / "hq")
    class_folders(tmp_path / "outside")
    at = open_page()
    at.selectbox(key="import_kind").select("folders").run()
    at.selectbox(key="import_role_folders").select("validation").run()
    offered = at.selectbox(key="import_folder").options
    assert str(folder) in offered and str(folder / "0") in offered
    assert not any("outside" in option for option in offered)  # only under the data roots
    at.selectbox(key="import_folder").select(str(folder)).run()
    at.button(key="import_start").click().run()
    assert not at.exception, at.exception
    job = import_jobs(workspace)[-1]
    assert job.params == {"kind": "folders", "role": "validation", "root": str(folder)}
    wait_for_job(workspace, job.id, lambda j: j.status not in jobs.ACTIVE)
    at.run()
    assert (
        f"Import #1 finished. {literal('hq-validation')}: 4 imported, 0 already present, "
        "1 skipped" in page_text(at)
    )
    assert "unreadable or not an image" in page_text(at)  # the bad file, by name

    at.button(key="import_start").click().run()  # the same source again
    wait_for_job(workspace, import_jobs(workspace)[-1].id, lambda j: j.status not in jobs.ACTIVE)
    at.run()
    assert f"Import #2 finished. {literal('hq-validation')}: 0 imported, 4 already present" in page_text(at)
    assert sources_frame(workspace.db_url)["images"].tolist() == [4]


def zipped(files: dict[str, bytes]) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return data.getvalue()


def test_import_an_upload_unpacks_it_into_the_workspace(workspace, tmp_path):
    png = write_image(tmp_path / "p.png").read_bytes()
    at = open_page()
    at.selectbox(key="import_kind").select("unlabelled").run()
    at.radio(key="import_origin").set_value("an upload").run()
    at.file_uploader(key="import_upload").set_value(
        ("evil.zip", zipped({"pool/a.png": png, "../../escape.png": png}), "application/zip")
    )
    at.run()
    at.button(key="import_upload_start").click().run()
    reason = "'../../escape.png' points outside"
    assert f"{literal('evil.zip')} was not imported: {literal(reason)}" in page_text(at)
    assert import_jobs(workspace) == [] and not (tmp_path / "escape.png").exists()

    at.file_uploader(key="import_upload").set_value(
        ("pool.zip", zipped({"pool/a.png": png, "pool/b.png": png}), "application/zip")
    )
    at.run()
    at.button(key="import_upload_start").click().run()
    assert not at.exception, at.exception
    job = import_jobs(workspace)[-1]
    root = Path(job.params["root"])
    assert root.name == "pool" and root.parent.parent == workspace.datasets / "uploads"
    assert sorted(p.name for p in root.iterdir()) == ["a.png", "b.png"]
    assert job.params["kind"] == "unlabelled" and job.params["role"] == "unlabelled"
    wait_for_job(workspace, job.id, lambda j: j.status not in jobs.ACTIVE)
    at.run()
    assert f"Import #{job.id} finished. {literal('pool-unlabelled')}: 2 imported" in page_text(at)


def test_names_from_users_and_files_show_as_written(workspace, tmp_path):
    source = "**bold** _x_ [link](http://e) <b> $y$ :red[z]"
    photo, broken = "#1 *a* `b`.png", "[c](d) <i>.png"
    write_image(tmp_path / "train" / "0" / photo)
    for grade in (1, 2, 3):
        write_image(tmp_path / "train" / str(grade) / f"g{grade}.png")
    (tmp_path / "train" / "0" / broken).write_text("oops")
    import_source(workspace.db_url, "folders", tmp_path / "train", "train", source)

    at = open_page()
    assert at.main.metric[0].label == f"{literal(source)}: largest / smallest class"
    assert any(e.label.startswith(f"Import report of {literal(source)}: ") for e in at.expander)
    assert f"{literal('0/' + broken)}: unreadable" in page_text(at)
    captions = [caption for image in at.image for caption in image.captions]
    assert literal(f"{Path(photo).stem} · grade 0 (0)") in captions
