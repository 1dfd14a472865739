"""The soak run's settings: its own topics and store, CPU-sized defaults, and the environment wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import load_settings
from worker.tools.run_settings import settings_env
from worker.tools.soak import _SOAK_DEFAULTS, _soak_settings


def test_soak_settings_are_isolated_and_cpu_sized_unless_the_environment_says_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WORKER_MAX_SEQ_LEN", "48")
    monkeypatch.delenv("WORKER_MIN_NEW_EVENTS", raising=False)
    base = load_settings()
    s = _soak_settings(base, "r1", tmp_path)

    assert s.max_seq_len == 48
    assert s.min_new_events == _SOAK_DEFAULTS["min_new_events"] != base.min_new_events
    assert s.input_topic == "soak-r1-clicks" != base.input_topic
    assert (s.group_id, s.redis_prefix, s.model_store) == ("soak-r1", "soak-r1", tmp_path / "models")
    env = settings_env(s)
    assert env["WORKER_MAX_SEQ_LEN"] == "48" and env["WORKER_METRICS_PORT"] == "0"
