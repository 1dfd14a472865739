"""The README states what the code does: its settings table and commands are checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

from worker.cli import COMMANDS
from worker.config import Settings
from worker.tools.schemas import README, readme_with_table


def test_settings_table_matches_the_settings_class() -> None:
    text = README.read_text()
    assert text == readme_with_table(text), "README settings table is stale: run `python -m worker schemas`"
    for name in Settings.model_fields:
        assert f"`WORKER_{name.upper()}`" in text


def test_every_setting_has_a_description() -> None:
    assert [n for n, f in Settings.model_fields.items() if not f.description] == []


def test_readme_names_the_two_setup_commands_and_every_cli_command() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    for name in COMMANDS:
        assert re.search(rf"python -m worker {name}\b", text), f"README does not document `{name}`"


def test_makefile_targets_exist() -> None:
    makefile = (Path(README).parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
