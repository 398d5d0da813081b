"""What every command line of the project (`python -m engine.…`, `db.…`, `bench.…`) shares:
--help that shows defaults, messages with time and level, and a progress bar on a terminal.

Modules log through `logging.getLogger(__name__)`, and a command's main() calls
setup_logging() once: the messages go to stderr, which a job's log file receives. What a
command is asked for (a table, a listing, a report) goes to stdout with print, to be piped.
"""

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# The module a `python -m` command runs logs as __main__.
LOGGERS = ("engine", "db", "bench", "__main__")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every option's default: its value,
    "none", or the words of the option's help where it says it (a default worked out at run
    time, say)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._either_or: set[int] = set()

    def add_usage(self, usage, actions, groups, prefix=None) -> None:
        # An option of a required either-or group has no default: one of the group is given.
        self._either_or = {
            id(action) for group in groups if group.required for action in group._group_actions
        }
        super().add_usage(usage, actions, groups, prefix)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.required
            or id(action) in self._either_or
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (a test swaps it for each test)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Show the project's messages from `level` up on stderr. Calling it again changes nothing
    but the level (tests run several commands in one process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(handler, _Stderr) for handler in logger.handlers):
            logger.addHandler(_Stderr())


@contextmanager
def terminal_bar() -> Iterator[tqdm | None]:
    """A progress bar from 0 to 1 for a command run by hand on a terminal, with the messages
    logged meanwhile written above it; None where stderr is a file or a pipe (a job's log, a
    test), which get no bar."""
    if not sys.stderr.isatty():
        yield None
        return
    loggers = [logging.getLogger(name) for name in LOGGERS]
    bar_format = "{percentage:3.0f}%|{bar:30}| {desc} [{elapsed}]"
    with logging_redirect_tqdm(loggers), tqdm(total=1.0, file=sys.stderr, bar_format=bar_format) as bar:
        yield bar
