"""The app shell and the Dataset page, run headless with Streamlit's AppTest."""

from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from conftest import ROOT, write_image
from db.schema import Job
from db.session import session_scope
from engine import jobs
from engine.sources import import_source
from engine.workspace import Workspace


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch) -> Workspace:
    monkeypatch.setenv("DR_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("DR_DEMO", "0")
    monkeypatch.delenv("DR_DATABASE_URL", raising=False)
    return Workspace.from_env()


def run_app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    return " ".join(e.value for e in [*at.info, *at.markdown, *at.caption, *at.warning])


def test_empty_workspace_shows_a_sentence(workspace):
    at = run_app()
    assert at.title[0].value == "Dataset"
    assert "No datasets yet" in texts(at)
    assert str(workspace.root) in texts(at)  # the sidebar names the workspace


def test_first_start_launches_the_demo_job(workspace, monkeypatch):
    monkeypatch.setenv("DR_DEMO", "1")
    at = run_app()
    job = jobs.latest_job(workspace.db_url, "demo")
    try:
        assert job is not None and job.status in jobs.ACTIVE
        assert "Building the demo workspace" in texts(at)
        run_app()  # a second browser session does not start a second build
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
    workspace.root.mkdir(parents=True)
    from db.session import migrate
    migrate(workspace.db_url)
    import_source(workspace.db_url, "folders", tmp_path / "train", "train", "curated")
    import_source(workspace.db_url, "unlabelled", tmp_path / "pool", "unlabelled", "pool")

    at = run_app()
    assert len(at.get("plotly_chart")) == 1  # one role with labels: train
    assert [m.value for m in at.main.metric] == ["3.0×"]  # 3 images of grade 0 over 1 of grade 1
    overview = {m.label: m.value for m in at.sidebar.metric}
    assert overview == {"Labelled": "7", "Runs": "0", "Predicted": "0", "Candidates": "0",
                        "Reviewed": "0"}
    reports = [e.label for e in at.expander]
    assert any("curated: 7 imported" in r and "1 skipped" in r for r in reports)
    assert "unreadable or not an image" in texts(at)
    assert len(at.image) == 8  # a page of four photographs, each beside its preprocessed view

    at.selectbox(key="gallery_source").select("pool").run()
    assert not at.exception and len(at.image) == 2
    at.selectbox(key="gallery_grade").select(3).run()
    assert "pool has no images of this grade" in texts(at)
