"""README documents every command-line option (README "Training options"), so it cannot drift."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pogdiff.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _command(*names: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _section(title: str, end: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(title)
    return text[start:text.index(end, start + len(title))]


def _table_flags(text: str) -> set[str]:
    """Flags named in the first column of the markdown table rows of ``text``."""
    return {f for line in text.splitlines() if line.startswith("| `")
            for f in re.findall(r"`(--[a-z0-9-]+)`", line.split(" | ")[0])}


def test_every_train_flag_is_in_the_training_options_table_and_no_other():
    table = _table_flags(_section("### Training options", "### Options of the other commands"))
    assert table == _flags(_command("train"))
    assert {"--optimizer", "--report-to", "--no-balanced-sampling"} <= table


def _subcommands(*names: str) -> list[str]:
    sub = next(a for a in _command(*names)._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


# Every benchmark the registry mounts under ``bench`` has its table, a new one included.
OTHER_COMMANDS = [("sample",), ("export",), *(("bench", name) for name in _subcommands("bench"))]


@pytest.mark.parametrize("command", OTHER_COMMANDS, ids=" ".join)
def test_every_flag_of_the_other_commands_is_in_its_table(command):
    section = _section("### Options of the other commands", "## Export and the Hub")
    part = section[section.index(f"#### `{' '.join(command)}`"):]
    part = part[:part.find("\n#### ", 1)] if "\n#### " in part[1:] else part
    assert _table_flags(part) == _flags(_command(*command))
