"""The Retrain page's model card and exports (AppTest): a finished run's card for everyone;
for an admin, an ONNX export as a real background job, then its check and its zip."""

import io
import zipfile

import pytest
from conftest import CALIBRATION, open_page, page_text, wait_for_job
from streamlit.testing.v1 import AppTest
from test_review import register_run
from test_roles import PASSWORD, quick_hashes, signed_in  # noqa: F401 (a fixture)

from db.schema import Run
from db.session import session_scope
from db.users import TERMINAL, add_account
from engine.loop.export_model import export_folder, latest_export, zipped
from engine.runtime import jobs


@pytest.fixture
def finished(workspace) -> int:
    """A finished run "tiny" with a checkpoint of the tiny test model and a calibration."""
    run_id = register_run(workspace)
    with session_scope(workspace.db_url) as session:
        session.get(Run, run_id).calibration = CALIBRATION
    return run_id


def card_text(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("# Model card: "))


def download_keys(at: AppTest) -> set[str]:
    return {button.key for button in at.download_button}


def test_an_admins_onnx_export_runs_as_a_job_and_offers_its_check_and_zip(workspace, finished):
    at = open_page("retrain")
    card = card_text(at)
    assert card.startswith("# Model card: tiny\n\nRun 1 of the DR grading app")
    assert "| expected calibration error | 0.1200 | 0.0340 |" in card  # this run's figures
    assert "card_download" in download_keys(at) and "export_download" not in download_keys(at)

    at.button(key="export_onnx").click().run()
    assert not at.exception, at.exception
    job = latest_export(workspace.db_url, finished)
    out = workspace.root / "export" / "tiny-onnx"
    assert job.params == {"run": finished, "format": "onnx", "out": str(out)}
    assert f"Export job #{job.id} started" in page_text(at)
    job = wait_for_job(workspace, job.id, lambda row: row.status not in jobs.ACTIVE, timeout=120)
    assert job.status == "done", jobs.log_tail(job.log_path)
    assert job.message == f"done: {out}"

    at.run()
    assert not at.exception, at.exception
    text = page_text(at)
    assert f"Export #{job.id}, onnx" in text
    assert "largest probability difference" in text and "the same grades" in text
    assert "export_download" in download_keys(at)
    archive = zipfile.ZipFile(io.BytesIO(zipped(out)))
    assert sorted(archive.namelist()) == [
        "tiny-onnx/MODEL_CARD.md",
        "tiny-onnx/model.json",
        "tiny-onnx/model.onnx",
    ]
    # Another export of the run does not touch this one: it gets a folder of its own.
    assert export_folder(workspace, "tiny", "onnx").name.startswith("tiny-onnx-20")


def test_a_reviewer_reads_the_card_but_cannot_export(workspace, finished):
    add_account(workspace.db_url, "ben", "reviewer", PASSWORD, user=TERMINAL)
    at = signed_in("ben").switch_page("views/retrain.py").run()
    assert not at.exception, at.exception
    assert card_text(at).startswith("# Model card: tiny")
    assert "card_download" in download_keys(at)
    assert not {"export_onnx", "export_safetensors"} & {button.key for button in at.button}
