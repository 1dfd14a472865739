"""Promotion before publication: a worker SIGKILLed after a promotion is recorded and before its
model-version event and scores reach Kafka; the worker that starts next publishes both from the
registry's outbox (at least once, deduplicated by (segment, version) on the consumer's side)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import TopicReader, WorkerProc, in_stream_order, read_all, worker_env

from worker.config import Settings
from worker.state.buffer import Buffer
from worker.state.registry import Registry
from worker.stream.kafka import ensure_topics, partition_count
from worker.tools.datasets import load_homedepot
from worker.tools.replay import produce_events

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parents[1])

_KILL_AFTER_PROMOTION = """
import os
import signal
import sys

from worker.state.registry import Registry

_record = Registry.record


def record(self, rec, gated_against=None):
    stored = _record(self, rec, gated_against)
    if stored.scope == "segment" and stored.decision == "promoted":
        os.kill(os.getpid(), signal.SIGKILL)
    return stored


Registry.record = record
from worker.cli import main

sys.exit(main(["run"]))
"""


def test_a_promotion_killed_before_its_publication_is_published_after_restart(
    settings: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    stream = load_homedepot().stream()
    picked = [e for s in ("Hampton Bay", "GE") for e in [x for x in stream if x.segment == s][:48]]
    others = [e for e in stream if e.segment not in ("Hampton Bay", "GE")][:160]
    events = in_stream_order(picked + others)
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    launcher = tmp_path / "kill.py"
    launcher.write_text(_KILL_AFTER_PROMOTION)
    log = tmp_path / "worker.log"
    first = WorkerProc(
        worker_env(settings, PYTHONPATH=REPO), log, argv=[sys.executable, str(launcher)], name="first"
    )
    procs.append(first)
    assert produce_events(settings, events, restamp=True) == len(events)
    deadline = time.monotonic() + 400
    while first.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.proc.returncode == -signal.SIGKILL, first.tail()

    registry = Registry.from_settings(settings)
    [(segment, version)] = [
        (s, v) for s in registry.segments() if (v := registry.champion_version(s)) is not None
    ]
    published = read_all(settings, settings.versions_topic, idle_s=2)
    assert not [v for v in published if v["scope"] == "segment"], "the kill came before publication"

    buffer = Buffer(settings)
    [partition] = [
        p for p in range(partition_count(settings, settings.input_topic)) if segment in buffer.segments(p)
    ]
    candidates = {(c.query, c.item_id) for c in buffer.candidates(partition, segment)}
    assert candidates

    def scored(seen: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {
            (s["query"], s["item_id"])
            for s in seen
            if s["segment"] == segment and s["model_version"] == version
        }

    second = WorkerProc(worker_env(settings, {"min_new_events": 100000}, PYTHONPATH=REPO), log, name="second")
    procs.append(second)
    scores = TopicReader(settings, settings.scores_topic)
    try:
        seen = scores.until(lambda seen: scored(seen) == candidates, 180)
    finally:
        scores.close()
    assert scored(seen) == candidates, "the new champion's scores, one for every candidate"
    time.sleep(2)
    assert second.terminate() == 0
    versions = [
        v
        for v in read_all(settings, settings.versions_topic)
        if (v["scope"], v["segment"]) == ("segment", segment)
    ]
    assert {v["version"] for v in versions} == {version}, "the promotion's model-version event"
    assert [v["decision"] for v in versions] == ["promoted"], "once, as its consumers dedupe it by version"
