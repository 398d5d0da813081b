"""Command lines that explain themselves: every option of every `python -m` command has help
text, and --help shows its default."""

import argparse
import importlib
import inspect
import sys

import pytest

from cli import HelpFormatter

COMMANDS = [
    "engine.loop.demo",
    "engine.loop.export_model",
    "engine.loop.import_model",
    "engine.model.infer",
    "engine.loop.loopgain",
    "engine.training.model_card",
    "engine.data.preprocess",
    "engine.model.saliency",
    "engine.data.sources",
    "engine.data.synth",
    "engine.training.train",
    "db.copy",
    "db.users",
    "bench.inference",
    "bench.pool",
    "bench.realdata",
    "bench.review_bench",
    "bench.tiles",
    "bench.training",
    "bench.viewer",
]


class Parsed(Exception):
    """Raised in place of parsing: the parser is what the test wants."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser that the command's main() builds, taken before it parses anything."""

    def capture(self, *_args, **_kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [module_name])
    main = importlib.import_module(module_name).main
    with pytest.raises(Parsed) as parsed:
        main([]) if inspect.signature(main).parameters else main()
    return parsed.value.parser


def parsers(parser: argparse.ArgumentParser):
    """The parser and those of its subcommands."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_option_has_help_and_shows_its_default(module_name, monkeypatch):
    for parser in parsers(parser_of(module_name, monkeypatch)):
        assert parser.formatter_class is HelpFormatter, parser.prog
        formatter = parser._get_formatter()
        either_or = {
            id(a)
            for group in parser._mutually_exclusive_groups
            if group.required
            for a in group._group_actions
        }
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"{parser.prog} {name} has no help text"
            if action.option_strings and not action.required and id(action) not in either_or:
                assert "default" in formatter._get_help_string(action), (
                    f"{parser.prog} {name} does not show its default"
                )


def test_the_help_shows_values_none_and_defaults_in_words(monkeypatch, capsys):
    parser = parser_of("engine.training.train", monkeypatch)
    text = parser.format_help()
    assert "images per step (default: 16)" in " ".join(text.split())
    assert "report to this job row (set by the app) (default: none)" in " ".join(text.split())
    assert "(default: the date and time)" in " ".join(text.split())
    # One of --data-path and --from-db is required: neither has a default to show.
    formatter = parser._get_formatter()
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    either_or = [action for action in parser._actions if action.dest in ("data_path", "from_db")]
    assert len(either_or) == 2
    assert not any("default" in formatter._get_help_string(action) for action in either_or)
