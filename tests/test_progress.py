"""What a command says while it works, run by hand: on a terminal, a progress bar and messages
with time and level; where stderr is a file (a job's log), the same messages and no bar."""

import io
import re
import sys
from pathlib import Path

import pytest
from conftest import write_image
from test_infer import checkpoint  # noqa: F401 (a fixture)

from engine.data import sources
from engine.model import infer

TIME_AND_LEVEL = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def logged(text: str) -> list[str]:
    """The messages logged with time and level, without the bar's redraws around them."""
    return [line for line in re.split(r"[\r\n]+", text) if TIME_AND_LEVEL.match(line)]


class Terminal(io.StringIO):
    """stderr as a terminal shows it: what tqdm and the log handler write, in order."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    for i in range(6):
        write_image(tmp_path / "pool" / f"p{i}.png", value=40 * i)
    return tmp_path / "pool"


def test_infer_on_a_terminal_draws_a_bar_to_the_end_and_logs_with_time_and_level(
    workspace,
    checkpoint,
    pool,
    monkeypatch,  # noqa: F811
):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = ["--checkpoint", str(checkpoint), "--images", str(pool), "--batch-size", "2", "--workers", "0"]
    assert infer.main(args) == 0
    shown = terminal.getvalue()
    assert re.search(r"\r100%\|[█#]+\| 6/6 images, [\d.]+ images/s, 0 s left \[", shown), shown
    assert [line[20:] for line in logged(shown)] == [
        "INFO pool-unlabelled: 6 listed, 6 imported, 0 already present, 0 skipped"
    ]


def test_an_import_on_a_terminal_draws_a_bar_and_elsewhere_none(workspace, pool, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    command = ["import", "--kind", "unlabelled", "--path", str(pool), "--role", "unlabelled"]
    assert sources.main(command) == 0
    assert re.search(r"\r100%\|[█#]+\| checking images: 6/6 \[", terminal.getvalue())

    log = io.StringIO()  # a file, as a job's log is
    monkeypatch.setattr(sys, "stderr", log)
    assert sources.main([*command[:-2], "--role", "unlabelled", "--name", "again"]) == 0
    assert log.getvalue() == ""  # no bar, and nothing to say


def test_an_error_is_logged_with_its_level(workspace, tmp_path, monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    missing = tmp_path / "nowhere"
    assert (
        sources.main(["import", "--kind", "unlabelled", "--path", str(missing), "--role", "unlabelled"]) == 2
    )
    said = log.getvalue()
    assert logged(said) == [said.rstrip("\n")] and said[20:].startswith("ERROR import stopped: ")
    assert "folder not found" in said
