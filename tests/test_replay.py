"""Replaying the real Home Depot data into Kafka and ingesting it, twice."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from ingest_helpers import ingest_all, total_stats

from worker.config import Settings
from worker.state.buffer import Buffer
from worker.stream.kafka import ensure_topics
from worker.tools.replay import dataset_events, replay

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 1500


@pytest.mark.integration
def test_replaying_twice_adds_nothing_the_second_time(settings: Settings) -> None:
    s = settings.model_copy(update={"topic_partitions": 3})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=3)
    events, restamp = dataset_events("homedepot", LIMIT)
    assert restamp and len(events) == LIMIT
    assert replay(s, "homedepot", limit=LIMIT) == LIMIT
    buffer = ingest_all(s).buffer
    first = total_stats(buffer, 3)
    assert first["events"] == LIMIT and first.get("duplicates", 0) == 0 and first.get("dlq", 0) == 0

    env = {
        **os.environ,
        "WORKER_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "WORKER_REDIS_URL": s.redis_url,
        "WORKER_INPUT_TOPIC": s.input_topic,
    }
    cli = subprocess.run(
        [sys.executable, "-m", "worker", "replay", "homedepot", "--limit", str(LIMIT), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"produced {LIMIT} events" in cli.stdout
    ingest_all(s)
    second = total_stats(buffer, 3)
    assert second["events"] == LIMIT and second["duplicates"] == LIMIT and second.get("dlq", 0) == 0

    want = Counter(e.segment for e in events)
    got: Counter[str] = Counter()
    for p in range(3):
        for seg in buffer.segments(p):
            c = buffer.counts(p, seg)
            got[seg] += c.events
            assert c.duplicates == c.events
    assert got == want
    buffer.purge()


def test_holdout_pairs_are_never_replayed() -> None:
    from worker.tools.datasets import load_homedepot

    data = load_homedepot()
    held = {e.event_id for pairs in data.holdout.values() for e in pairs}
    events, _ = dataset_events("homedepot")
    assert held and not held & {e.event_id for e in events}
    assert len(events) == len(data.events) - len(held)


@pytest.mark.integration
def test_jsonl_events_keep_their_timestamps(settings: Settings, tmp_path: Path) -> None:
    from worker.events import ClickEvent, now_utc

    ts = now_utc().replace(microsecond=0)
    path = tmp_path / "events.jsonl"
    rows = [
        ClickEvent(
            event_id=f"j{i}", ts=ts, segment="s", query="q", item_id=str(i), item_text="t", clicked=i % 2
        )
        for i in range(5)
    ]
    path.write_bytes(b"\n".join(r.to_json() for r in rows) + b"\n")
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=1)
    assert replay(settings, str(path)) == 5
    buffer: Buffer = ingest_all(settings).buffer
    snap = buffer.training_snapshot(0, "s")
    assert [e.ts for e in snap.new_events] == [ts] * 5
    assert [e.event_id for e in snap.new_events] == [f"j{i}" for i in range(5)]
    buffer.purge()
