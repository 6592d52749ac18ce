"""Every command-line tool shows its defaults, and kaggle_build has help per command."""

import pytest

from utils.cli import format_duration
from utils.kaggle import build as kaggle_build


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as done:
        kaggle_build.main(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def test_kaggle_build_lists_one_command_a_line_and_helps_each(capsys):
    out = _help(["--help"], capsys)
    for name, (short, _) in kaggle_build.COMMANDS.items():
        assert f"    {name}" in out and short in out
    assert "COMMAND --help" in out and "docs/kaggle.md" not in out
    build = _help(["build", "--help"], capsys)
    assert "write one folder per kernel" in build
    assert "build folder (default: " in build and "(default: None)" not in build
    assert "(default: False)" not in build  # a flag's default says nothing


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (42.2, "42 s"),
        (185, "3 min 05 s"),
        (3599.6, "1 h 00 min"),
        (7500, "2 h 05 min"),
    ],
)
def test_durations_read_the_same_everywhere(seconds, text):
    assert format_duration(seconds) == text
