"""Help text of the command-line tools: every option's default, shown once and only when set."""

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
