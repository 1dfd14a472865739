"""How a command prints its result, and what dispatch says of a command that is not installed."""

from __future__ import annotations

import json

import pytest

from worker.commands import ToolingMissing, dispatch, write_result


def test_a_result_is_one_json_line_or_aligned_lines(capsys: pytest.CaptureFixture[str]) -> None:
    write_result({"events": 3, "events_per_s": 1.5}, as_json=True)
    assert json.loads(capsys.readouterr().out) == {"events": 3, "events_per_s": 1.5}
    write_result({"events": 3, "events_per_s": 1.5}, as_json=False)
    assert capsys.readouterr().out.splitlines() == ["      events: 3", "events_per_s: 1.5"]


def test_a_command_whose_module_is_not_installed_is_named() -> None:
    table = {"gone": ("worker.tools.not_there", "?")}
    with pytest.raises(ToolingMissing, match="not_there"):
        dispatch(table, "gone", [], "prog")
