"""What the command-line tools print: help text with every option's default shown once and only
when set, and durations in one format."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends `(default: X)` to an option's help unless the default is None or False (an unset
    option, a flag) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = all(action.default is not unset for unset in (None, False, argparse.SUPPRESS))
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class RawDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsHelpFormatter with the description kept as written (a docstring's layout)."""


def format_duration(seconds: float) -> str:
    """'42 s', '3 min 05 s' or '2 h 05 min' (rounded to the second)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
