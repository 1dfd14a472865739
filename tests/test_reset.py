"""`python -m worker reset` against the real Kafka and Redis: it refuses a running group, moves the stored
and the committed offsets together, and takes back what the replayed range stored, so that consuming
it again leaves the buffers as one pass over the topic on a fresh Redis leaves them."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from ingest_helpers import caught_up, event_doc, high_watermarks, ingest_all, produce_raw
from registry_helpers import shared_record, version_record
from worker_helpers import WorkerProc, worker_env

from worker.config import Settings
from worker.state.buffer import Buffer
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.stream.kafka import ensure_topics, make_admin
from worker.stream.reset import committed

pytestmark = pytest.mark.integration

PARTITIONS = 3
SEGMENTS = ["brand-a", "brand-b", "cat:c", "d", "e", "f", "g", "h"]
CAPS = {"new_events_cap": 8, "sample_cap": 16, "candidates_cap": 5}


def _docs(lo: int, hi: int) -> list[dict[str, Any]]:
    return [event_doc(i, SEGMENTS[i % len(SEGMENTS)], query=f"q{i % 9}") for i in range(lo, hi)]


def _produce(settings: Settings, docs: list[dict[str, Any]], bad: int = 0) -> None:
    msgs: list[tuple[bytes | None, bytes | None]] = [(d["segment"].encode(), orjson.dumps(d)) for d in docs]
    msgs += [(b"brand-a", b"{not json")] * bad
    produce_raw(settings, msgs)


def _stream(settings: Settings) -> datetime:
    """Two halves with a time between them; the second repeats ids of the first and of itself, and
    both hold dead letters. Returns the time between the halves."""
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=PARTITIONS)
    first = _docs(0, 120)
    _produce(settings, first, bad=2)
    time.sleep(0.3)
    middle = datetime.now(UTC)
    time.sleep(0.3)
    second = _docs(120, 240)
    _produce(settings, [*second, *first[100:110], *second[:5], *first[:3]], bad=3)
    return middle


def _reset(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "reset", *args],
        env=worker_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _state(buffer: Buffer) -> dict[str, Any]:
    """Everything the buffer holds per partition but the wall-clock times (dedup and activity scores)
    and the `stale` counter (redeliveries the write script skipped)."""
    r = buffer.redis
    out: dict[str, Any] = {}
    for p in range(PARTITIONS):
        stats = buffer.partition_stats(p)
        stats.pop("stale", None)
        segs: dict[str, Any] = {}
        for name in buffer.segments(p):
            segs[name] = {
                "counts": buffer.counts(p, name),
                "new": r.lrange(buffer.segment_key(p, name, "new"), 0, -1),
                "sample": r.lrange(buffer.segment_key(p, name, "sample"), 0, -1),
                "cand": r.hgetall(buffer.segment_key(p, name, "cand")),
                "candz": r.zrange(buffer.segment_key(p, name, "candz"), 0, -1, withscores=True),
            }
        out[f"p{p}"] = {
            "next": buffer.stored_offset(p),
            "stats": {k: v for k, v in stats.items() if v},
            "dedup": sorted(r.zrange(buffer.partition_key(p, "dedup"), 0, -1)),
            "active": sorted(r.zrange(buffer.partition_key(p, "active"), 0, -1)),
            "segments": segs,
        }
    return out


def _offsets(settings: Settings, buffer: Buffer) -> tuple[dict[int, int | None], dict[int, int | None]]:
    parts = list(range(PARTITIONS))
    return buffer.stored_offsets(parts), committed(settings, make_admin(settings), parts)


def _busiest(offsets: dict[int, int | None]) -> int:
    return max(offsets, key=lambda p: offsets[p] or 0)


def _capped(settings: Settings) -> Settings:
    return settings.model_copy(update=CAPS)


def test_reset_to_a_time_then_ingest_equals_one_pass_on_a_fresh_redis(settings: Settings) -> None:
    settings = _capped(settings)
    middle = _stream(settings)
    buffer = ingest_all(settings).buffer
    marks = high_watermarks(settings)
    assert buffer.stored_offsets(marks) == marks, "every partition gets events"

    done = _reset(settings, "--to-datetime", middle.isoformat())
    assert done.returncode == 0, done.stderr
    assert "clears" in done.stdout
    stored, kafka = _offsets(settings, buffer)
    assert stored == kafka
    assert all(0 < (stored[p] or 0) < marks[p] for p in marks), (stored, marks)
    ingest_all(settings)

    fresh = settings.model_copy(
        update={"redis_prefix": f"{settings.redis_prefix}f", "group_id": "f" + settings.group_id}
    )
    fresh_buffer = ingest_all(fresh).buffer
    try:
        again, once = _state(buffer), _state(fresh_buffer)
        assert again == once
        assert sum(s["stats"].get("events", 0) for s in once.values()) == 240
        assert sum(s["stats"].get("duplicates", 0) for s in once.values()) == 18
        assert sum(s["stats"].get("dlq", 0) for s in once.values()) == 5
    finally:
        fresh_buffer.purge()
        buffer.purge()


def test_reset_refuses_while_an_ingest_worker_runs(settings: Settings, tmp_path: Path) -> None:
    _stream(settings)
    worker = WorkerProc(
        worker_env(settings), tmp_path / "ingest.log", argv=[sys.executable, "-m", "worker", "ingest"]
    )
    buffer = Buffer(settings)
    try:
        worker.wait_for_event("assigned", 60)
        deadline = time.monotonic() + 60
        while not caught_up(settings, buffer):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.2)
        time.sleep(1.5)  # the worker's asynchronous commit of its last batch
        before, state = _offsets(settings, buffer), _state(buffer)
        refused = _reset(settings, "--to-earliest")
        assert refused.returncode != 0
        assert "live member" in refused.stderr and "nothing changed" in refused.stderr
        assert _offsets(settings, buffer) == before
        assert _state(buffer) == state
    finally:
        assert worker.terminate() == 0
        buffer.purge()


def test_dry_run_prints_the_plan_and_changes_nothing(settings: Settings) -> None:
    _stream(settings)
    buffer = ingest_all(settings).buffer
    try:
        before, state = _offsets(settings, buffer), _state(buffer)
        p = _busiest(before[0])
        end = before[0][p]
        dry = _reset(settings, "--dry-run", "--to-offset", f"{p}:0")
        assert dry.returncode == 0, dry.stderr
        assert f"partition {p}: stored offset {end} -> 0, Kafka group offset {end} -> 0; clears" in dry.stdout
        assert "nothing changed" in dry.stdout
        assert len(dry.stdout.splitlines()) == 2
        assert _offsets(settings, buffer) == before
        assert _state(buffer) == state
    finally:
        buffer.purge()


def test_to_offset_and_to_earliest_replay_to_the_same_buffers(settings: Settings) -> None:
    settings = _capped(settings)
    _stream(settings)
    buffer = ingest_all(settings).buffer
    try:
        once = _state(buffer)
        stored, _ = _offsets(settings, buffer)
        p = _busiest(stored)
        half = (stored[p] or 0) // 2
        moved = _reset(settings, "--to-offset", f"{p}:{half}")
        assert moved.returncode == 0, moved.stderr
        after, kafka = _offsets(settings, buffer)
        assert after[p] == kafka[p] == half
        assert {q: o for q, o in after.items() if q != p} == {q: o for q, o in stored.items() if q != p}
        ingest_all(settings)
        assert _state(buffer) == once

        earliest = _reset(settings, "--to-earliest")
        assert earliest.returncode == 0, earliest.stderr
        after, kafka = _offsets(settings, buffer)
        assert after == kafka == dict.fromkeys(range(PARTITIONS), 0)
        assert all(not s["segments"] and not s["dedup"] for s in _state(buffer).values())
        ingest_all(settings)
        assert _state(buffer) == once
    finally:
        buffer.purge()


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--to-datetime", "yesterday noon"], "not an ISO 8601 time"),
        (["--to-offset", "7:0"], "not [7]"),
        (["--to-offset", "1-5"], "not PARTITION:OFFSET"),
        (["--to-offset", "0:99999"], "past the end"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(settings: Settings, args: list[str], why: str) -> None:
    _stream(settings)
    buffer = ingest_all(settings).buffer
    try:
        before, state = _offsets(settings, buffer), _state(buffer)
        bad = _reset(settings, *args)
        assert bad.returncode == 2
        assert why in bad.stderr and "nothing changed" in bad.stderr
        assert _offsets(settings, buffer) == before
        assert _state(buffer) == state
    finally:
        buffer.purge()


def test_exactly_one_target_is_required(settings: Settings) -> None:
    both = _reset(settings, "--to-earliest", "--to-offset", "0:0")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    neither = _reset(settings, "--dry-run")
    assert neither.returncode == 2 and "one of the arguments" in neither.stderr


def test_models_are_kept_unless_asked_and_then_drop_to_zero_shot(settings: Settings) -> None:
    _stream(settings)
    buffer = ingest_all(settings).buffer
    registry = Registry.from_settings(settings, buffer.redis)
    version = registry.next_version("d")
    adapter = registry.adapter_dir("d", version)
    adapter.mkdir(parents=True)
    registry.record(version_record("d", version, str(adapter)))
    shared = registry.shared()
    shared_version = shared.next_version(SHARED_SEGMENT)
    shared_dir = shared.adapter_dir(SHARED_SEGMENT, shared_version)
    shared_dir.mkdir(parents=True)
    shared.record(shared_record(shared_version, shared_dir))
    try:
        kept = _reset(settings, "--to-earliest")
        assert kept.returncode == 0, kept.stderr
        assert registry.champion_version("d") == version
        dropped = _reset(settings, "--to-earliest", "--models")
        assert dropped.returncode == 0, dropped.stderr
        assert "models: 1 segments and the shared model back to zero-shot" in dropped.stdout
        assert registry.champion_version("d") is None and not adapter.exists()
        assert shared.champion_version(SHARED_SEGMENT) is None and not shared_dir.exists()
        assert registry.next_version("d") > version
    finally:
        buffer.purge()
