"""Idle segments expire with their buffers, marks and adapters, against the real Redis; nothing else goes."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from ingest_helpers import event_doc
from registry_helpers import version_record

from worker.config import Settings
from worker.ops.quality import Prequential
from worker.state import keys
from worker.state.buffer import Buffer, PartitionWrite, Pending, SegmentState
from worker.state.entry import pair_key
from worker.state.registry import Registry
from worker.state.retention import sweep
from worker.stream.trigger import DueSegment, Trigger

pytestmark = pytest.mark.integration

OLD_MS = 1_000


@pytest.fixture
def buffer(settings: Settings) -> Iterator[Buffer]:
    b = Buffer(settings.model_copy(update={"new_events_cap": 8, "sample_cap": 16, "candidates_cap": 3}))
    yield b
    b.purge()


@pytest.fixture
def reg(settings: Settings) -> Registry:
    return Registry.from_settings(settings)


def write(buffer: Buffer, segment: str, offsets: range, partition: int = 0, prefix: str = "e") -> None:
    events = []
    for i in offsets:
        doc = event_doc(i, segment, event_id=f"{prefix}-{i}")
        pair = pair_key(doc["query"], doc["item_id"])
        events.append(Pending(i, segment, doc["event_id"], doc["clicked"], pair, orjson.dumps(doc)))
    buffer.write([PartitionWrite(buffer.topic, partition, offsets.stop, events)])


def backdate(buffer: Buffer, segment: str, partition: int = 0) -> None:
    """The segment's last event long ago: the write recorded it, the test moves it back."""
    active = buffer.partition_key(partition, "active")
    h = buffer.segment_hash(segment)
    assert buffer.redis.zscore(active, h) is not None, "the write script records the last event time"
    buffer.redis.zadd(active, {h: OLD_MS})


def now_ms() -> int:
    return int(time.time() * 1000)


def state(buffer: Buffer, segment: str, partition: int = 0) -> tuple[Any, ...]:
    return (
        buffer.counts(partition, segment),
        buffer.training_snapshot(partition, segment),
        buffer.candidates(partition, segment),
    )


def stored_keys(buffer: Buffer) -> set[str]:
    return {k.decode() for k in buffer.redis.scan_iter(match=keys.prefix_pattern(buffer.prefix))}


def test_an_idle_segment_expires_with_its_keys_and_mark_and_a_busy_one_keeps_everything(
    buffer: Buffer,
) -> None:
    write(buffer, "idle", range(0, 6))
    write(buffer, "busy", range(6, 12))
    idle, busy = buffer.segment_hash("idle"), buffer.segment_hash("busy")
    buffer.mark_shared_seen({(0, idle): 6, (0, busy): 6})
    backdate(buffer, "idle")
    before = state(buffer, "busy")
    stats, offset = buffer.partition_stats(0), buffer.stored_offset(0)

    assert buffer.expire_idle(0, now_ms() - 60_000) == ["idle"]

    assert not [k for k in stored_keys(buffer) if idle in k]
    assert buffer.segments(0) == ["busy"]
    assert buffer.redis.zrange(buffer.partition_key(0, "active"), 0, -1) == [busy.encode()]
    assert buffer.shared_seen() == {(0, busy): 6}
    assert state(buffer, "busy") == before
    assert (buffer.partition_stats(0), buffer.stored_offset(0)) == (stats, offset)
    assert buffer.expire_idle(0, now_ms() - 60_000) == []


def test_a_segment_that_gets_an_event_after_it_was_picked_stays(
    buffer: Buffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event lands between the pick (outside the script) and the script: the script's own check of
    the last event time keeps the segment."""
    write(buffer, "s", range(0, 3))
    backdate(buffer, "s")
    script = buffer._expire

    def event_first(**kwargs: Any) -> Any:
        write(buffer, "s", range(3, 4))
        return script(**kwargs)

    monkeypatch.setattr(buffer, "_expire", event_first)
    assert buffer.expire_idle(0, now_ms() - 60_000) == []
    c = buffer.counts(0, "s")
    assert (c.events, c.seq, c.new) == (4, 4, 4)
    assert buffer.segments(0) == ["s"]


def test_an_expired_segment_that_comes_back_starts_afresh(buffer: Buffer) -> None:
    write(buffer, "s", range(0, 5))
    buffer.mark_shared_seen({(0, buffer.segment_hash("s")): 5})
    backdate(buffer, "s")
    assert buffer.expire_idle(0, now_ms()) == ["s"]

    write(buffer, "s", range(5, 8), prefix="back")
    c = buffer.counts(0, "s")
    assert (c.events, c.seq, c.new, c.sample, c.trained_seq) == (3, 3, 3, 3, 0)
    snap = buffer.training_snapshot(0, "s")
    assert [e.event_id for e in snap.new_events] == ["back-5", "back-6", "back-7"]
    assert (snap.seq_from, snap.seq_to) == (1, 3)
    assert buffer.segments(0) == ["s"]
    assert buffer.shared_seen() == {}


def test_expiry_is_refused_to_an_owner_the_partition_has_moved_away_from(buffer: Buffer) -> None:
    ((epoch, _),) = buffer.acquire([0]).values()
    write(buffer, "s", range(0, 2))
    backdate(buffer, "s")
    buffer.acquire([0])
    assert buffer.expire_idle(0, now_ms(), epoch=epoch) == []
    assert buffer.segments(0) == ["s"]
    assert buffer.expire_idle(0, now_ms(), epoch=epoch + 1) == ["s"]


def _promote(reg: Registry, segment: str) -> int:
    version = reg.next_version(segment)
    path = reg.adapter_dir(segment, version)
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    reg.record(version_record(segment, version, str(path)), gated_against=reg.champion_version(segment))
    return version


def test_forget_removes_records_and_adapters_but_versions_keep_counting(reg: Registry) -> None:
    old = [_promote(reg, "GE") for _ in range(3)]
    _promote(reg, "other")
    store = reg.adapter_dir("GE", 1).parent
    assert store.is_dir()

    reg.forget("GE")

    assert (reg.versions("GE"), reg.champion("GE"), reg.outboxes(["GE"])) == ([], None, [])
    assert reg.segments() == ["other"]
    assert not store.exists()
    assert reg.next_version("GE") > max(old)
    assert [r.version for r in reg.versions("other")] == [1]
    assert reg.adapter_dir("other", 1).is_dir()


def test_the_sweep_expires_idle_segments_of_owned_partitions_everywhere(
    buffer: Buffer, reg: Registry
) -> None:
    placed = ((0, "idle"), (0, "busy"), (1, "unowned"), (2, "moved"), (0, "moved"))
    for i, (partition, segment) in enumerate(placed):
        write(buffer, segment, range(10 * i, 10 * i + 2), partition, prefix=segment)
    for segment in ("idle", "busy", "unowned", "moved"):
        _promote(reg, segment)
    for partition, segment in ((0, "idle"), (1, "unowned"), (0, "moved")):
        backdate(buffer, segment, partition)
    forgotten: list[tuple[int, str]] = []

    def args(retention_s: int) -> tuple[Any, ...]:
        return (buffer, reg, [0, 2], retention_s, lambda p, s: forgotten.append((p, s)))

    assert sweep(*args(0), all_partitions=range(3)) == []
    got = sweep(*args(3600), all_partitions=range(3))

    assert sorted(got) == sorted(forgotten) == [(0, "idle"), (0, "moved")]
    assert reg.versions("idle") == [] and not reg.adapter_dir("idle", 1).exists()
    assert [r.version for r in reg.versions("moved")] == [1], "still stored on partition 2"
    assert [r.version for r in reg.versions("unowned")] == [1] and buffer.segments(1) == ["unowned"]
    assert [r.version for r in reg.versions("busy")] == [1] and buffer.segments(0) == ["busy"]


def test_an_expired_segment_is_forgotten_by_the_trigger_and_the_online_metrics(settings: Settings) -> None:
    jobs: queue.Queue[DueSegment] = queue.Queue()
    trigger = Trigger(settings, jobs)
    trigger.assigned([0])
    trigger.observe([SegmentState(0, "s", 40, 40, 20, 20, 0)])
    job = jobs.get_nowait()
    assert trigger.still_owned(job)
    trigger.forget(0, "s")
    assert not trigger.still_owned(job), "a job already queued is skipped"
    trigger.done(job)
    trigger.tick()
    assert jobs.empty() and trigger.queued() == set()

    pq = Prequential(window=4, max_segments=1)
    pq.record("s", [0.2, 0.8], [0, 1])
    pq.forget("s")
    pq.record("t", [0.2, 0.8], [0, 1])
    assert pq.labelled_segments() == ["t"]


class _Evicting:
    """Stands in for `Learner`: remembers what was evicted."""

    def __init__(self) -> None:
        self.evicted: list[str] = []

    def evict(self, segment: str) -> None:
        self.evicted.append(segment)


def test_the_worker_sweeps_its_owned_partitions_once_a_minute(settings: Settings) -> None:
    from worker.app import Worker

    worker = Worker(settings.model_copy(update={"segment_retention_s": 60}))
    learner = _Evicting()
    worker.learner = learner  # type: ignore[assignment]
    buffer = worker.buffer
    try:
        ((epoch, _),) = buffer.acquire([0]).values()
        worker.ingestor.ownership.owned = frozenset({0})
        worker.ingestor.ownership.epochs[(buffer.topic, 0)] = epoch
        write(buffer, "idle", range(0, 2))
        write(buffer, "busy", range(2, 4))
        backdate(buffer, "idle")
        worker.trigger.assigned([0])
        worker.metrics.prequential.record("idle", [0.2, 0.8], [0, 1])

        worker.housekeeping.expire_idle()
        backdate(buffer, "busy")
        worker.housekeeping.expire_idle()

        assert buffer.segments(0) == ["busy"], "the second sweep waits a minute"
        assert learner.evicted == ["idle"]
        assert worker.metrics.prequential.labelled_segments() == []
        assert "ctr_worker_segments_expired_total 1.0" in worker.metrics.render().decode()
    finally:
        worker.request_consumer.close()
        worker.lease.close()
        worker.ingestor.consumer.close()
        buffer.purge()
