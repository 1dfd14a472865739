"""Scale-out: three real `python -m worker run` processes in one consumer group, one of them SIGKILLed.

What must hold when partitions (and so segments) move between workers: a segment is trained by one worker
at a time, version numbers are never reused, every event is counted once, and the survivor that takes a
segment over continues from the champion the dead worker promoted (its parent version).

The gate is opened wide and everything is tiny (16 tokens, 1 epoch, ~40 events a segment) so that three
torch processes fit a 2-core CI box; the learning itself is tested elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from worker_helpers import TopicReader, WorkerProc, worker_env

from worker.config import Settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer
from worker.state.registry import Registry
from worker.stream.kafka import ensure_topics
from worker.tools.datasets import load_homedepot
from worker.tools.replay import produce_events

pytestmark = [pytest.mark.integration, pytest.mark.scale]

PARTITIONS = 6
WORKERS = 3
FIRST = 40  # events of each test segment before the kill
MORE = 32  # events of each of the dead worker's segments after it
OTHERS = 200  # events of other segments, so every worker has pooled data for the shared model
TERMINAL = {"segment run", "no shared model serves yet: segment waits", "training job failed"}


# On top of worker_helpers.SMALL: six partitions, quick session expiry, one torch thread per worker,
# the shared model bootstrapped from 40 events and never retrained.
SCALE: dict[str, object] = {
    "topic_partitions": PARTITIONS,
    "session_timeout_ms": 6000,
    "train_backoff_s": 1,
    "shared_every": 1000000,
    "shared_bootstrap_min_events": 40,
    "shared_epochs": 1,
    "drain_grace_s": 30,
    "torch_threads": 1,
}


def _read_until(
    versions: TopicReader,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout_s: float,
    procs: list[WorkerProc],
) -> None:
    def check() -> None:
        for p in procs:
            assert p.killed_at is not None or p.alive(), f"{p.name} exited early\n{_tails(procs)}"

    versions.until(done, timeout_s, check)
    assert done(versions.seen), f"timed out; versions so far: {versions.seen}\n{_tails(procs)}"


def _tails(procs: list[WorkerProc]) -> str:
    return "\n".join(f"--- {p.name}\n{p.log.read_text()[-2500:]}" for p in procs)


def _wait(cond: Callable[[], bool], timeout_s: float, what: str, procs: list[WorkerProc]) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{_tails(procs)}"
        time.sleep(0.2)


def _ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00")).timestamp()


def _intervals(p: WorkerProc) -> list[tuple[str, float, float]]:
    """(segment, start, end) of each segment training in a worker's log; one still running when the
    worker was killed ends at the kill (an unfinished one in a live worker never ends)."""
    out: list[tuple[str, float, float]] = []
    open_: dict[str, float] = {}
    for rec in p.lines():
        seg = rec.get("segment")
        if seg is None:
            continue
        if rec.get("event") == "training":
            assert seg not in open_, f"{p.name} started {seg!r} twice without finishing"
            open_[seg] = _ts(rec)
        elif rec.get("event") in TERMINAL and seg in open_:
            out.append((seg, open_.pop(seg), _ts(rec)))
    end = p.killed_at if p.killed_at is not None else float("inf")
    out += [(seg, start, end) for seg, start in open_.items()]
    return out


def _pick_segments(stream: list[ClickEvent]) -> list[str]:
    """One busy segment per partition under librdkafka's default partitioner (CRC32 of the key), so
    every worker owns test segments; the test reads the real placement back from Redis anyway."""
    counts: dict[str, int] = {}
    for e in stream:
        counts[e.segment] = counts.get(e.segment, 0) + 1
    picked: dict[int, str] = {}
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        part = zlib.crc32(name.encode()) % PARTITIONS
        if name not in ("unknown", "Unbranded") and n >= 200 and part not in picked:
            picked[part] = name
    return [picked[p] for p in sorted(picked)]


def _by_segment(stream: list[ClickEvent], segments: list[str]) -> dict[str, list[ClickEvent]]:
    out: dict[str, list[ClickEvent]] = {s: [] for s in segments}
    for e in stream:
        if e.segment in out:
            out[e.segment].append(e)
    return out


def _segment_versions(seen: list[dict[str, Any]], segment: str) -> list[dict[str, Any]]:
    return [v for v in seen if v["scope"] == "segment" and v["segment"] == segment]


def test_three_workers_one_killed_segments_move_without_overlap(
    settings: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    stream = load_homedepot().stream()
    segments = _pick_segments(stream)
    per_segment = _by_segment(stream, segments)
    others = [e for e in stream if e.segment not in per_segment][:OTHERS]
    first = sorted(
        [e for s in segments for e in per_segment[s][:FIRST]] + others,
        key=lambda e: int(e.event_id.split("-")[1]),
    )

    ensure_topics(settings, [settings.input_topic], partitions=PARTITIONS)
    ensure_topics(settings, [settings.dlq_topic, settings.versions_topic, settings.scores_topic])
    for i in range(WORKERS):
        procs.append(WorkerProc(worker_env(settings, SCALE), tmp_path / f"w{i}.log", name=f"w{i}"))
    all_parts = set(range(PARTITIONS))

    def balanced() -> bool:
        owned = [p.owned() for p in procs]
        return all(len(o) == PARTITIONS // WORKERS for o in owned) and set().union(*owned) == all_parts

    _wait(balanced, 120, "three workers to share the six partitions", procs)

    produced = produce_events(settings, first, restamp=True)
    assert produced == len(first)
    versions = TopicReader(settings, settings.versions_topic)
    _read_until(
        versions,
        lambda seen: all(
            any(v["decision"] == "promoted" for v in _segment_versions(seen, s)) for s in segments
        ),
        150,
        procs,
    )

    buffer = Buffer(settings)
    registry = Registry.from_settings(settings)
    placement = {s: p for p in range(PARTITIONS) for s in buffer.segments(p)}
    assert set(segments) <= placement.keys()
    # Quiet point: every segment of the test trained on everything it has, nothing running.
    _wait(
        lambda: (
            all(buffer.counts(placement[s], s).new == 0 for s in segments)
            and all(all(end < float("inf") for _, _, end in _intervals(p)) for p in procs)
        ),
        60,
        "the workers to go idle",
        procs,
    )
    owner = {s: next(p for p in procs if placement[s] in p.owned()) for s in segments}
    victim = max(procs, key=lambda p: sum(owner[s] is p for s in segments))
    victim_segments = [s for s in segments if owner[s] is victim]
    assert victim_segments, f"no test segment on any worker? {placement}"
    champions = {s: registry.champion_version(s) for s in victim_segments}
    assert all(champions.values()), champions
    victim_parts = victim.owned()

    victim.kill()
    survivors = [p for p in procs if p is not victim]

    def taken_over() -> bool:
        owned = [p.owned() for p in survivors]
        return set().union(*owned) == all_parts and not owned[0] & owned[1]

    _wait(taken_over, 60, "the survivors to take the dead worker's partitions", procs)

    more = sorted(
        [e for s in victim_segments for e in per_segment[s][FIRST : FIRST + MORE]],
        key=lambda e: int(e.event_id.split("-")[1]),
    )
    assert produce_events(settings, more, restamp=True) == len(more)
    produced += len(more)

    def continued(seen: list[dict[str, Any]]) -> bool:
        return all(
            any(v["version"] > champions[s] for v in _segment_versions(seen, s)) for s in victim_segments
        )

    _read_until(versions, continued, 90, procs)
    for p in survivors:
        p.proc.send_signal(signal.SIGTERM)
    for p in survivors:
        assert p.proc.wait(timeout=60) == 0, _tails(procs)

    # The survivors continued from the dead worker's champion.
    takers = set()
    for s in victim_segments:
        after = [v for v in _segment_versions(versions.seen, s) if v["version"] > champions[s]]
        assert after[0]["parent_version"] == champions[s], (s, champions[s], after[0])
        assert after[0]["decision"] == "promoted", after[0]
        takers |= {p.name for p in survivors if any(seg == s for seg, _, _ in _intervals(p))}
    assert takers, "no survivor trained the dead worker's segments"

    # One worker at a time per segment: intervals of the same segment in different logs never overlap.
    spans = [(seg, start, end, p.name) for p in procs for seg, start, end in _intervals(p)]
    for i, (seg, start, end, name) in enumerate(spans):
        for seg2, start2, end2, name2 in spans[i + 1 :]:
            if seg == seg2 and name != name2:
                assert end <= start2 or end2 <= start, f"{seg!r} trained at once by {name} and {name2}"

    # No version reused: per segment (and the shared model), unique across all workers. A decision the
    # killed worker recorded may be published again by its partition's next owner (the registry is the
    # outbox; consumers dedupe by segment and version), so a number may repeat only as the same event. A
    # segment is trained by one worker at a time, so its versions also arrive in order; every worker may
    # train the shared model at once (each on its own partitions), so shared decisions can arrive out of
    # order.
    keys = {(v["scope"], v["segment"]) for v in versions.seen}
    for scope, seg in keys:
        events = [v for v in versions.seen if (v["scope"], v["segment"]) == (scope, seg)]
        first: dict[int, dict[str, Any]] = {}
        for v in events:
            assert first.setdefault(v["version"], v) == v, f"{scope} {seg!r} reused version {v['version']}"
        numbers = list(first)
        if scope == "segment":
            assert numbers == sorted(numbers), f"{scope} {seg!r} versions out of order: {numbers}"
    for s in segments:
        recorded = [r.version for r in registry.versions(s)]
        published = [v["version"] for v in _segment_versions(versions.seen, s)]
        assert set(recorded) <= set(published), (s, recorded, published)

    # Every event counted once, across the kill and the move.
    counted = sum(buffer.partition_stats(p).get("events", 0) for p in range(PARTITIONS))
    assert counted == produced
    assert victim_parts


def _bench(settings: Settings, *args: str, timeout_s: float = 240) -> dict[str, Any]:
    env = {
        **os.environ,
        "WORKER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "WORKER_REDIS_URL": settings.redis_url,
    }
    out = subprocess.run(
        [sys.executable, "-m", "worker", "bench", *args, "--json"],
        env=env,
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    result: dict[str, Any] = orjson.loads(out.stdout.decode().strip().splitlines()[-1])
    return result


def test_bench_scale_runs_tiny(settings: Settings) -> None:
    result = _bench(settings, "scale", "--workers", "1,2", "--events", "3000", "--segments", "30")
    assert result["note"] == "2 cores: shape only"
    assert [r["workers"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert {"workers", "events_per_s", "raw_events_per_s", "ratio"} <= row.keys()
        assert row["events_per_s"] > 0 and row["raw_events_per_s"] > 0
        ratio = row["events_per_s"] / row["raw_events_per_s"]
        assert row["ratio"] == pytest.approx(ratio, abs=0.0006), "printed to 3 decimals"
        assert row["events_counted"] == 3000


def test_bench_capacity_runs_tiny_under_the_cap(settings: Settings) -> None:
    result = _bench(settings, "capacity", "--segments", "20", "--cap", "5", "--cold-loads", "10")
    assert result["segments"] == 20 and result["max_resident_adapters"] == 5
    assert 0 < result["resident_adapters"] <= 5
    assert set(result["rss_mib"]) == {"start", "backbone", "shared_model", "after_scoring"}
    assert all(v > 0 for v in result["rss_mib"].values())
    for key in ("cold_load", "raw_load_file", "score_one_pair"):
        assert result[key]["p50_ms"] > 0 and result[key]["p95_ms"] >= result[key]["p50_ms"]
    assert result["cold_load"]["n"] == 10
    assert result["cold_load_ratio_p50"] > 0
