"""What every command line of the project (`python -m engine.…`, `db.…`, `bench.…`) shares."""

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every option's default: its value,
    "none", or the words of the option's help where it says it (a default worked out at run
    time, say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.required
            or action.default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"
