"""Ownership and Redis faults against the real Kafka and Redis (issue #37, items 1 and 3): a Redis that
comes back behind the consumer, a zombie owner, a revoked training, rebalance callbacks that fail.

Each test fails on a buffer without the owner epoch and the continuity check: there, a Redis restored
from an older state silently loses the events in between, a zombie's write lands, a revoked training
trims the new owner's events, and a failing callback leaves two consumers owning one partition."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from ingest_helpers import Background, caught_up, event_doc, produce_docs, stored_event_ids, total_stats
from test_buffer import pending

from worker.config import Settings
from worker.state import keys
from worker.state.buffer import Buffer, PartitionWrite
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics

pytestmark = pytest.mark.integration


def _poll_until(ingestor: Ingestor, done: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        ingestor.poll_once()
    ingestor.flush()


def _dump(buffer: Buffer) -> dict[bytes, bytes]:
    return {k: buffer.redis.dump(k) for k in buffer.redis.scan_iter(match=keys.prefix_pattern(buffer.prefix))}  # type: ignore[misc]


def _restore(buffer: Buffer, dumped: dict[bytes, bytes]) -> None:
    """Every key of the prefix back to `dumped`, in one transaction: Redis went back in time."""
    pipe = buffer.redis.pipeline(transaction=True)
    for key in buffer.redis.scan_iter(match=keys.prefix_pattern(buffer.prefix)):
        pipe.unlink(key)
    for key, value in dumped.items():
        pipe.restore(key, 0, value, replace=True)
    pipe.execute()


@pytest.mark.parametrize("restored", ["older", "empty"])
def test_redis_back_behind_the_consumer_rewinds_and_buffers_every_event_once(
    settings: Settings, restored: str
) -> None:
    """Redis restored from a snapshot taken after the first third (or from nothing): the consumer is two
    thirds in, its next write is refused, it seeks back to what Redis holds, and every event ends up
    buffered exactly once."""
    partitions, n = 2, 600
    s = settings.model_copy(update={"consume_batch": 50})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=partitions)
    docs = [event_doc(i, f"seg-{i % 6}") for i in range(n)]
    ingestor = Ingestor(s)
    buffer = ingestor.buffer
    ingestor.subscribe()
    try:
        produce_docs(s, docs[:200])
        _poll_until(ingestor, lambda: caught_up(s, buffer))
        snapshot = _dump(buffer) if restored == "older" else {}
        produce_docs(s, docs[200:400])
        _poll_until(ingestor, lambda: caught_up(s, buffer))
        _restore(buffer, snapshot)
        produce_docs(s, docs[400:])
        _poll_until(ingestor, lambda: caught_up(s, buffer))
        assert ingestor.stats.rewinds >= 1
        ids = stored_event_ids(buffer, partitions)
        assert sorted(ids) == sorted(d["event_id"] for d in docs)
        stats = total_stats(buffer, partitions)
        assert stats["events"] == n and stats.get("duplicates", 0) == 0
    finally:
        ingestor.close()
        buffer.purge()


def test_a_zombie_owner_is_refused_and_nothing_is_lost_or_doubled(settings: Settings) -> None:
    """Two writers of one partition on their own connections: the one with the older epoch is refused,
    before and after the new owner writes, and each event is stored once."""
    old, new = Buffer(settings), Buffer(settings)
    try:
        ((old_epoch, _),) = old.acquire([0]).values()
        ((new_epoch, stored),) = new.acquire([0]).values()
        assert new_epoch == old_epoch + 1 and stored is None
        first = [pending(i) for i in range(10)]
        zombie = old.write([PartitionWrite(old.topic, 0, 10, first, epoch=old_epoch, expected=-1)])
        assert zombie.fenced == {(old.topic, 0): new_epoch} and zombie.added == 0
        assert new.stored_offset(0) is None and new.segments(0) == []
        owner = new.write([PartitionWrite(new.topic, 0, 10, first, epoch=new_epoch, expected=-1)])
        assert owner.added == 10 and not owner.fenced
        later = [pending(i) for i in range(10, 20)]
        zombie = old.write([PartitionWrite(old.topic, 0, 20, later, epoch=old_epoch, expected=10)])
        assert zombie.fenced and zombie.added == 0
        owner = new.write([PartitionWrite(new.topic, 0, 20, later, epoch=new_epoch, expected=10)])
        assert owner.added == 10
        ids = stored_event_ids(new, 1)
        assert sorted(ids) == sorted(f"e-{i}" for i in range(20))
        assert new.partition_stats(0) == {"events": 20}
    finally:
        new.purge()


def test_a_training_of_a_partition_owned_elsewhere_since_trims_nothing(settings: Settings) -> None:
    buffer = Buffer(settings)
    try:
        ((epoch, _),) = buffer.acquire([0]).values()
        buffer.write([PartitionWrite(buffer.topic, 0, 12, [pending(i) for i in range(12)], epoch=epoch)])
        buffer.acquire([0])
        assert buffer.mark_trained(0, "s", 12, epoch=epoch) == -1
        c = buffer.counts(0, "s")
        assert (c.new, c.trained_seq, c.last_trained_ms) == (12, 0, 0)
        ((epoch, _),) = buffer.acquire([0]).values()
        assert buffer.mark_trained(0, "s", 12, epoch=epoch) == 12
    finally:
        buffer.purge()


def test_an_ingestor_fenced_by_a_new_owner_stops_owning_and_writes_nothing(settings: Settings) -> None:
    s = settings.model_copy(update={"consume_batch": 20})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=1)
    ingestor = Ingestor(s)
    buffer = ingestor.buffer
    ingestor.subscribe()
    try:
        produce_docs(s, [event_doc(i, "a") for i in range(40)])
        _poll_until(ingestor, lambda: caught_up(s, buffer))
        assert ingestor.owned_partitions() == {0}
        Buffer(s).acquire([0])  # another consumer took the partition over
        produce_docs(s, [event_doc(i, "a") for i in range(40, 80)])
        deadline = time.monotonic() + 30
        while ingestor.owned_partitions():
            assert time.monotonic() < deadline
            ingestor.poll_once()
        assert ingestor.stats.fenced == 1 and ingestor.epoch(0) is None
        for _ in range(5):
            ingestor.poll_once()
        assert buffer.stored_offset(0) == 40 and total_stats(buffer, 1)["events"] == 40
    finally:
        ingestor.close()
        buffer.purge()


def _wait_split(a: Background, b: Background, partitions: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        owned_a, owned_b = a.ingestor.owned_partitions(), b.ingestor.owned_partitions()
        if owned_a and owned_b and len(owned_a) + len(owned_b) == partitions:
            return
        assert time.monotonic() < deadline, (owned_a, owned_b, a.error, b.error)
        time.sleep(0.1)


def test_a_failing_revoke_callback_still_gives_the_partitions_up(settings: Settings) -> None:
    """The first consumer's `before_revoke` raises when the second joins: it still forgets what it lost,
    so no partition is owned twice, and its stale epoch trims nothing of the new owner's segments."""
    partitions = 4
    s = settings.model_copy(update={"consume_batch": 50, "session_timeout_ms": 10_000})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=partitions)

    def fail(_: set[int]) -> None:
        raise RuntimeError("injected failure in before_revoke")

    a = Background(Ingestor(s, before_revoke=fail))
    b = Background(Ingestor(s))
    produce_docs(s, [event_doc(i, f"seg-{i % 20}") for i in range(400)])
    a.start()
    deadline = time.monotonic() + 60
    while len(a.ingestor.owned_partitions()) < partitions:
        assert time.monotonic() < deadline and a.error is None
        time.sleep(0.1)
    old_epochs = {p: a.ingestor.epoch(p) for p in range(partitions)}
    try:
        b.start()
        _wait_split(a, b, partitions)
        assert a.error is None and b.error is None
        assert a.ingestor.owned_partitions().isdisjoint(b.ingestor.owned_partitions())
        while not caught_up(s, a.ingestor.buffer):
            assert time.monotonic() < deadline + 60
            time.sleep(0.1)
        moved = sorted(b.ingestor.owned_partitions())
        buffer = b.ingestor.buffer
        for p in moved:
            for segment in buffer.segments(p):
                before = buffer.counts(p, segment).new
                assert buffer.mark_trained(p, segment, 10**9, epoch=old_epochs[p]) == -1
                assert buffer.counts(p, segment).new == before
    finally:
        for bg in (a, b):
            bg.stop.set()
            bg.join(30)
        a.ingestor.buffer.purge()
    assert a.error is None and b.error is None


def test_an_assignment_whose_redis_reads_fail_is_taken_once_redis_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis fails inside the assign callback: the rebalance still completes (partitions assigned and
    paused), the poll loop takes ownership once Redis answers, and every event is buffered once."""
    s = settings.model_copy(update={"consume_batch": 50})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=2)
    ingestor = Ingestor(s)
    bg = Background(ingestor)
    real = ingestor.buffer.redis.pipeline
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        """The ingest thread's first two pipelines (its reads on assignment) fail."""
        if threading.current_thread() is bg:
            calls["n"] += 1
            if calls["n"] <= 2:
                raise redis.ConnectionError("injected: Redis unreachable during assignment")
        return real(*args, **kwargs)

    monkeypatch.setattr(ingestor.buffer.redis, "pipeline", flaky)
    docs = [event_doc(i, f"seg-{i % 5}") for i in range(300)]
    produce_docs(s, docs)
    bg.start()
    try:
        deadline = time.monotonic() + 90
        while not caught_up(s, ingestor.buffer):
            assert time.monotonic() < deadline and bg.error is None, bg.error
            time.sleep(0.1)
        assert calls["n"] >= 3 and ingestor.owned_partitions() == {0, 1}
    finally:
        bg.stop.set()
        bg.join(30)
    assert bg.error is None
    ids = stored_event_ids(ingestor.buffer, 2)
    assert sorted(ids) == sorted(d["event_id"] for d in docs)
    ingestor.buffer.purge()


def test_shared_seen_marks_only_move_forward(settings: Settings) -> None:
    """An older shared run that records after a newer one cannot hand back events already taken."""
    buffer = Buffer(settings)
    try:
        h = buffer.segment_hash("s")
        assert buffer.mark_shared_seen({(0, h): 10}) == 1
        assert buffer.mark_shared_seen({(0, h): 5, (1, h): 3}) == 1
        assert buffer.shared_seen() == {(0, h): 10, (1, h): 3}
    finally:
        buffer.purge()
