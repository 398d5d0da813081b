"""The app shell and the Dataset page, run headless with Streamlit's AppTest."""


from sqlalchemy import select

from conftest import open_page, page_text, write_image
from db.schema import Job
from db.session import session_scope
from engine import jobs
from engine.sources import import_source


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
        jobs.cancel_job(workspace.db_url, job.id)


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
    assert overview == {"Labelled": "7", "Runs": "0", "Predicted": "0", "Candidates": "0",
                        "Reviewed": "0"}
    reports = [e.label for e in at.expander]
    assert any("curated: 7 imported" in r and "1 skipped" in r for r in reports)
    assert "unreadable or not an image" in page_text(at)
    assert len(at.image) == 8  # a page of four photographs, each beside its preprocessed view

    at.selectbox(key="gallery_source").select("pool").run()
    assert not at.exception and len(at.image) == 2
    at.selectbox(key="gallery_grade").select(3).run()
    assert "pool has no images of this grade" in page_text(at)
