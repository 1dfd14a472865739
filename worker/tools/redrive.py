"""Re-driving dead letters: each one's original key, bytes and headers back to where it came from, once.

Progress lives in Redis (`worker.state.keys.dlq_redrive_*`), per DLQ partition: `next`, the offset below
which every record is handled (sent, or skipped for good), and `done`, the offsets at or above it that a
filtered run (`--reason`, `--since`) handled out of order. Both are written only after the producer's flush
confirmed the sends they cover, `done` before `next`, so a crash in between re-sends nothing it recorded;
a crash between a confirmed send and its record re-sends that batch on the next run (at most `BATCH`
messages; an event id already buffered is then dropped by ingest's dedup). One re-drive per DLQ runs at a
time, under a Redis lock.

A dead letter is skipped, and reported, when it cannot go back as it was or must not: re-driven
`WORKER_DLQ_REDRIVE_MAX` times already (`cap`), cut to fit the DLQ (`truncated`), its count header not a
count (`bad_count`), no usable source (`no_source`), a source that is not one of the worker's input topics
(`foreign_source`), or a second copy of a dead letter sent in this run (`duplicate`; the DLQ is
at-least-once).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from worker.config import Settings
from worker.state import client as clients
from worker.state.client import RedisClient
from worker.state.keys import dlq_redrive_done_key, dlq_redrive_lock_key, dlq_redrive_next_key
from worker.state.lock import Lock
from worker.stream.dlq import DeadLetterRecord, redrive_headers
from worker.stream.kafka import make_producer
from worker.tools.dlq_read import read_dlq

BATCH = 1000
"""Sends between two flushes and progress writes."""
LOCK_TTL_S = 60.0
FLUSH_TIMEOUT_S = 60.0


class RedriveError(RuntimeError):
    """The re-drive cannot start or go on: another one holds the lock, or its lock was lost."""


def skip_reason(record: DeadLetterRecord, cap: int, targets: Iterable[str]) -> str | None:
    """Why `record` must not be re-driven (see the module's docstring), None if it may."""
    if record.truncated:
        return "truncated"
    if record.redrive_count is None:
        return "bad_count"
    if record.redrive_count >= cap:
        return "cap"
    if record.source_topic is None or record.source_partition is None or record.source_offset is None:
        return "no_source"
    if record.source_topic not in targets:
        return "foreign_source"
    return None


class Progress:
    """What was re-driven from one DLQ, per partition (see the module's docstring)."""

    def __init__(self, client: RedisClient, prefix: str, dlq_topic: str) -> None:
        self.client = client
        self.prefix = prefix
        self.topic = dlq_topic
        self.next_key = dlq_redrive_next_key(prefix, dlq_topic)

    def next_offsets(self) -> dict[int, int]:
        raw = self.client.hgetall(self.next_key)
        return {int(p): int(o) for p, o in raw.items()}

    def done_from(self, partition: int, start: int) -> set[int]:
        key = dlq_redrive_done_key(self.prefix, self.topic, partition)
        return {int(m) for m in self.client.zrangebyscore(key, start, "+inf")}

    def record(self, partition: int, handled: Iterable[int], next_offset: int) -> None:
        """Out-of-order offsets first, then `next`, then drop what `next` now covers: each step alone
        leaves a state that claims nothing unsent."""
        key = dlq_redrive_done_key(self.prefix, self.topic, partition)
        above = {str(o): o for o in handled if o >= next_offset}
        if above:
            self.client.zadd(key, above)  # type: ignore[arg-type]
        self.client.hset(self.next_key, str(partition), str(next_offset))
        self.client.zremrangebyscore(key, "-inf", next_offset - 1)


@dataclass
class _Partition:
    """One DLQ partition during a run: where it started, what was handled, where the handled prefix ends."""

    start: int
    done: set[int]
    handled: set[int] = field(default_factory=set)
    scanned: int = 0
    gap: int | None = None
    """The first record not handled (filtered out, or its send failed): `next` stops there."""

    def next_offset(self) -> int:
        return self.gap if self.gap is not None else max(self.start, self.scanned)

    def leave(self, offset: int) -> None:
        self.gap = offset if self.gap is None else min(self.gap, offset)


@dataclass
class RedriveResult:
    sent: Counter[str] = field(default_factory=Counter)
    skipped: dict[str, Counter[str]] = field(default_factory=dict)
    """dlq.reason -> skip reason -> count."""
    already: int = 0
    """Records a filtered run handled before, met again above `next`."""
    failed: list[str] = field(default_factory=list)

    def skip(self, reason: str, why: str) -> None:
        self.skipped.setdefault(reason, Counter())[why] += 1


class Redriver:
    """One run of `dlq redrive`; `dry_run` reads, decides and reports, but neither sends nor records."""

    def __init__(
        self,
        settings: Settings,
        *,
        reasons: frozenset[str] = frozenset(),
        since_ms: int | None = None,
        dry_run: bool = False,
        client: RedisClient | None = None,
        producer: Producer | None = None,
    ) -> None:
        self.settings = settings
        self.reasons = reasons
        self.since_ms = since_ms
        self.dry_run = dry_run
        self.client = client or clients.from_settings(settings, socket_timeout=10)
        self.progress = Progress(self.client, settings.redis_prefix, settings.dlq_topic)
        self.producer = producer
        self.targets = {settings.input_topic, settings.requests_topic}
        self.result = RedriveResult()
        self._parts: dict[int, _Partition] = {}
        self._seen: set[tuple[object, ...]] = set()
        self._pending: list[tuple[int, int, str]] = []
        self._delivered: dict[tuple[int, int], str | None] = {}
        """(DLQ partition, offset) -> None once the broker confirmed the send, else its error."""

    def run(self) -> RedriveResult:
        if self.dry_run:
            self._scan()
            return self.result
        lock = Lock(
            self.client, dlq_redrive_lock_key(self.settings.redis_prefix, self.settings.dlq_topic), LOCK_TTL_S
        )
        if not lock.acquire():
            raise RedriveError(f"another re-drive of {self.settings.dlq_topic} is running ({lock.holder()})")
        own_producer = self.producer is None
        self.producer = self.producer or make_producer(self.settings)
        try:
            self._scan(lock)
        finally:
            if own_producer:
                self.producer.flush(FLUSH_TIMEOUT_S)
            lock.release()
        return self.result

    def _scan(self, lock: Lock | None = None) -> None:
        starts = self.progress.next_offsets()
        records = read_dlq(self.settings, starts)
        try:
            for record in records:
                self._handle(record, starts)
                if len(self._pending) >= BATCH:
                    self._commit(lock)
        finally:
            records.close()
        self._commit(lock)

    def _partition(self, record: DeadLetterRecord, starts: dict[int, int]) -> _Partition:
        part = self._parts.get(record.partition)
        if part is None:
            start = max(starts.get(record.partition, 0), record.offset)
            part = _Partition(start, self.progress.done_from(record.partition, start))
            self._parts[record.partition] = part
        return part

    def _handle(self, record: DeadLetterRecord, starts: dict[int, int]) -> None:
        part = self._partition(record, starts)
        part.scanned = record.offset + 1
        if record.offset in part.done:
            self.result.already += 1
            return
        if not self._matches(record):
            part.leave(record.offset)
            return
        why = skip_reason(record, self.settings.dlq_redrive_max, self.targets)
        if why is None:
            source = (
                record.source_topic,
                record.source_partition,
                record.source_offset,
                record.redrive_count,
            )
            if source in self._seen:
                why = "duplicate"
            self._seen.add(source)
        if why is not None:
            self.result.skip(record.reason, why)
            part.handled.add(record.offset)
            return
        self.result.sent[record.reason] += 1
        if self.dry_run:
            return
        self._send(record)

    def _matches(self, record: DeadLetterRecord) -> bool:
        if self.reasons and record.reason not in self.reasons:
            return False
        return self.since_ms is None or (
            record.timestamp_ms is not None and record.timestamp_ms >= self.since_ms
        )

    def _send(self, record: DeadLetterRecord) -> None:
        assert self.producer is not None
        assert record.source_topic is not None and record.source_partition is not None
        where = (record.partition, record.offset)

        def delivered(err: KafkaError | None, msg: Message) -> None:
            self._delivered[where] = None if err is None else str(err)

        while True:
            try:
                self.producer.produce(
                    record.source_topic,
                    value=record.value,
                    key=record.key,
                    partition=record.source_partition,
                    headers=redrive_headers(record),
                    on_delivery=delivered,
                )
                break
            except BufferError:
                self.producer.poll(0.1)
            except KafkaException as exc:
                self._delivered[where] = str(exc)
                break
        self._pending.append((*where, record.reason))

    def _commit(self, lock: Lock | None) -> None:
        """Flush, then record per partition what the broker confirmed; a send it did not confirm stops
        that partition's `next` (it is sent again by the next run) and counts as not sent."""
        if self.dry_run:
            return
        assert self.producer is not None
        if self._pending:
            self.producer.flush(FLUSH_TIMEOUT_S)
        for p, offset, reason in self._pending:
            error = self._delivered.get((p, offset), "delivery not confirmed")
            if error is None:
                self._parts[p].handled.add(offset)
            else:
                self._parts[p].leave(offset)
                self.result.sent[reason] -= 1
                self.result.failed.append(f"DLQ partition {p} offset {offset}: {error}")
        self._pending.clear()
        self._delivered.clear()
        if lock is not None and not lock.held():
            raise RedriveError("lost the re-drive lock; progress of this batch is not recorded")
        for p, part in self._parts.items():
            self.progress.record(p, part.handled, part.next_offset())
            part.done |= {o for o in part.handled if o >= part.next_offset()}
            part.handled.clear()
            part.start = part.next_offset()


def since_ms_of(iso: str) -> int:
    """An ISO 8601 date or datetime to epoch milliseconds; one without a zone is taken as UTC."""
    when = datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
