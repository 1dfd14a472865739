"""The poll loop: decode (`worker.stream.decode`), dead-letter or buffer; rebalance callbacks, pausing.

Delivery is at-least-once, results effectively-once: each consume batch is written to Redis by one script
per partition that stores the events *and* the next offset together (see `worker.state.buffer`), and on
assignment the consumer seeks to the offsets stored in Redis. A crash between the Redis write and the
Kafka commit therefore neither loses nor doubles an event; Kafka commits are asynchronous and only feed
lag monitoring.

At most one batch's Redis write is in flight: `poll_once` sends it and returns, and the next call decodes
its batch while Redis runs the scripts, then waits for them before sending its own. Rebalance callbacks
(which run inside `consume()`) and `close` wait for the write in flight first, so on revoke everything of
the revoked partitions is stored; Kafka offsets, stats and the trigger only see a write once it is done.

Ownership is fenced: on assignment the consumer takes a new owner epoch per partition
(`Buffer.acquire`), and every write carries it, so a zombie (a process that still believes it owns a
partition the group moved) has its writes refused and stops treating the partition as its own. Every
write also carries the stored offset the consumer continues from: when Redis comes back behind it (a
failover to a lagging replica, an AOF that lost its last second, a restore), the write is refused and
the consumer seeks back to what Redis holds, so the events in between are buffered again, not lost.
The rebalance callbacks never leave ownership half-changed: a revoke forgets its partitions whatever
fails on the way, and an assignment whose Redis reads fail is kept paused until they succeed.

Dead letters are produced, then confirmed by a producer flush, *before* the Redis write that covers their
offsets. A crash between the two re-dead-letters the message after restart: the DLQ is at-least-once.
If the DLQ cannot be confirmed within a tenth of `max.poll.interval.ms` the loop stops with an error
rather than store offsets past dead letters that might be lost.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

import redis
import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from redis.exceptions import OutOfMemoryError  # type: ignore[attr-defined]  # not in the stubs

from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.logs import configure_logging
from worker.state.buffer import Buffer, InflightWrite, PartitionWrite, Pending, WriteResult
from worker.state.entry import pair_key
from worker.stream.decode import Rejection, decode, fast_decode
from worker.stream.dlq import dead_letter
from worker.stream.kafka import ensure_topics, make_consumer, make_producer, max_record_bytes
from worker.stream.trigger import Trigger

log = structlog.get_logger("worker.stream.ingest")

COMMIT_INTERVAL_S = 1.0
PROGRESS_LOG_INTERVAL_S = 10.0


class DeadLetterError(RuntimeError):
    """The dead-letter topic did not confirm in time; offsets past those messages must not be stored."""


@dataclass(slots=True)
class _Slot:
    next_offset: int = 0
    events: list[Pending] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    ndead: int = 0


@dataclass
class IngestStats:
    consumed: int = 0
    added: int = 0
    duplicates: int = 0
    stale: int = 0
    dead: int = 0
    batches: int = 0
    kafka_errors: int = 0
    redis_outages: int = 0
    rewinds: int = 0
    fenced: int = 0
    dlq_failures: int = 0
    redis_oom: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


def _or_beginning(offset: int | None) -> int:
    return OFFSET_BEGINNING if offset is None else offset


class Ingestor:
    """Consumes `settings.input_topic` in group `settings.group_id` into the Redis buffer.

    With a `trigger` (see `worker.stream.trigger`), due segments go on its job queue and the input
    partitions are paused while that queue is full; without one, it only ingests.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        buffer: Buffer | None = None,
        trigger: Trigger | None = None,
        consumer: Consumer | None = None,
        producer: Producer | None = None,
        on_write: Callable[[WriteResult], None] | None = None,
        before_revoke: Callable[[set[int]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.buffer = buffer or Buffer(settings)
        self.trigger = trigger
        self.consumer = consumer or make_consumer(settings, error_cb=self._on_kafka_error)
        self.producer = producer or make_producer(settings)
        self.on_write = on_write
        self.before_revoke = before_revoke
        self.stats = IngestStats()
        self._owned: frozenset[int] = frozenset()
        self._paused = False
        self._dlq_errors: list[str] = []
        self._to_commit: dict[tuple[str, int], int] = {}
        self._last_commit = 0.0
        self._last_progress = time.monotonic()
        self._subscribed = False
        self._block_s = min(30.0, settings.max_poll_interval_ms / 1000 / 10)
        self._inflight: tuple[InflightWrite, list[tuple[tuple[str, int], int]]] | None = None
        self._epochs: dict[tuple[str, int], int] = {}
        self._expected: dict[tuple[str, int], int] = {}
        """(topic, partition) -> the stored next offset the next write continues from (-1: none)."""
        self._unacquired: dict[tuple[str, int], TopicPartition] = {}
        """Assigned, but ownership not yet taken in Redis (it failed): kept paused until it succeeds."""
        self._dropped: set[tuple[str, int]] = set()
        """Partitions whose batch, consumed before a rewind or a fence, must not be written."""
        self._failures_in_row = 0
        self._redis_full = False

    # Ownership and rebalancing

    def owned_partitions(self) -> frozenset[int]:
        """Input partitions assigned to this worker right now (read from any thread)."""
        return self._owned

    def epoch(self, partition: int) -> int | None:
        """The owner epoch this worker holds a partition of the input topic under (None: not owned)."""
        return self._epochs.get((self.settings.input_topic, partition))

    def subscribe(self) -> None:
        self.consumer.subscribe(
            [self.settings.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._subscribed = True

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Take ownership in Redis and start at the stored offsets. If Redis fails here, the partitions
        are assigned paused and `_acquire` tries again from the poll loop: the rebalance always
        completes, and nothing is consumed from a partition before its ownership is taken."""
        self._flush_quietly("assign")
        for tp in partitions:
            self._unacquired[(tp.topic, tp.partition)] = TopicPartition(tp.topic, tp.partition)
        try:
            positioned = self._take(list(self._unacquired))
        except Exception as exc:
            log.error("assign_failed_retrying", error=str(exc)[:300], partitions=sorted(self._unacquired))
            consumer.assign(partitions)
            consumer.pause(partitions)
            return
        consumer.assign(positioned)
        if self._paused and positioned:
            consumer.pause(positioned)
        self._owned_now(positioned)

    def _take(self, wanted: list[tuple[str, int]]) -> list[TopicPartition]:
        """New owner epochs and the stored offsets of `wanted`; they leave `_unacquired`."""
        by_topic: dict[str, list[int]] = {}
        for topic, p in wanted:
            by_topic.setdefault(topic, []).append(p)
        positioned = []
        for topic, parts in by_topic.items():
            for p, (epoch, stored) in self.buffer.acquire(parts, topic).items():
                self._epochs[(topic, p)] = epoch
                self._expected[(topic, p)] = -1 if stored is None else stored
                positioned.append(TopicPartition(topic, p, _or_beginning(stored)))
        for key in wanted:
            self._unacquired.pop(key, None)
        return positioned

    def _owned_now(self, positioned: list[TopicPartition]) -> None:
        self._owned = self._owned | {tp.partition for tp in positioned}
        log.info(
            "assigned",
            partitions=sorted(tp.partition for tp in positioned),
            offsets=[tp.offset for tp in positioned],
            epochs=[self._epochs[(tp.topic, tp.partition)] for tp in positioned],
        )
        if self.trigger is not None:
            self.trigger.assigned(tp.partition for tp in positioned)

    def _acquire(self) -> None:
        """Finish an assignment whose Redis reads failed: seek to the stored offsets, then resume."""
        positioned = self._take(list(self._unacquired))
        for tp in positioned:
            self.consumer.seek(tp)
        if not self._paused:
            self.consumer.resume(positioned)
        self._owned_now(positioned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let a running training of these partitions finish, store and commit what was consumed; and
        whatever of that fails, forget the partitions, so nothing of theirs is trained here any more."""
        try:
            if self.before_revoke is not None:
                self.before_revoke({tp.partition for tp in partitions})
            self.flush()
            self._commit(force=True, partitions={(tp.topic, tp.partition) for tp in partitions})
        except Exception as exc:
            self._inflight = None
            gone = sorted(tp.partition for tp in partitions)
            log.error("revoke_failed", error=str(exc)[:300], partitions=gone)
        finally:
            self._forget(partitions, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            self._flush_quietly("lost")
        finally:
            self._forget(partitions, "lost")

    def _flush_quietly(self, during: str) -> None:
        """`flush` inside a rebalance: a failed write is dropped (what it held is consumed again from
        the stored offsets by whoever owns the partition next), so the rebalance goes on."""
        try:
            self.flush()
        except Exception as exc:
            self._inflight = None
            log.error("flush_failed", during=during, error=str(exc)[:300])

    def _forget(self, partitions: list[TopicPartition], why: str) -> None:
        gone = {tp.partition for tp in partitions}
        self._owned = self._owned - gone
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._epochs.pop(key, None)
            self._expected.pop(key, None)
            self._unacquired.pop(key, None)
        for key in [k for k in self._to_commit if k[1] in gone]:
            del self._to_commit[key]
        if self.trigger is not None:
            self.trigger.revoked(gone)
        log.info(why, partitions=sorted(gone))

    # The loop

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> IngestStats:
        """Poll until `stop` is set (or nothing arrived for `idle_exit_s`), then store, commit and close."""
        if not self._subscribed:
            self.subscribe()
        last_message = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    n = self.poll_once()
                except redis.RedisError as exc:
                    self.recover(stop, exc)
                    continue
                now = time.monotonic()
                if n:
                    last_message = now
                elif idle_exit_s is not None and self._owned and now - last_message > idle_exit_s:
                    break
        finally:
            self.close()
        return self.stats

    def poll_once(self) -> int:
        """One consume batch end to end; returns how many messages it handled.

        The batch's Redis write is left in flight: the next call decodes its batch while Redis works, then
        waits for it before sending its own (`flush` waits too; so do rebalances and `close`).
        """
        s = self.settings
        if self._unacquired:
            self._acquire()
        msgs = self.consumer.consume(s.consume_batch, s.consume_timeout_s)
        if msgs:
            try:
                self._send(self._prepare(msgs))
            except DeadLetterError as exc:
                self._dead_letters_unconfirmed(exc)
                return len(msgs)
        else:
            self.flush()
        self.producer.poll(0)
        if self.trigger is not None:
            self.trigger.tick()
            self._backpressure(self.trigger.backlogged)
        self._commit()
        self._progress()
        return len(msgs)

    def process(self, msgs: Sequence[Message]) -> WriteResult | None:
        """Decode a batch, dead-letter the bad messages, write the rest and the offsets to Redis."""
        self._send(self._prepare(msgs))
        return self.flush()

    def flush(self) -> WriteResult | None:
        """Wait for the write in flight, if any, and account for it; returns its result."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return None
        write, slots = inflight
        result = write.wait()
        self._failures_in_row = 0
        self._redis_full = False
        for key, next_offset in slots:
            if key not in result.fenced and key not in result.rewound:
                self._to_commit[key] = next_offset
        for key, stored in result.rewound.items():
            self._rewind(key, stored)
        if result.fenced:
            self._fenced(result.fenced)
        st = self.stats
        st.batches += 1
        st.added += result.added
        st.duplicates += result.duplicates
        st.stale += result.stale
        st.dead += result.dead
        if self.trigger is not None and result.segments:
            self.trigger.observe(result.segments)
        if self.on_write is not None:
            self.on_write(result)
        return result

    def _rewind(self, key: tuple[str, int], stored: int | None) -> None:
        """Redis holds less than this consumer wrote (it lost data): consume again from what it holds."""
        self.stats.rewinds += 1
        self._dropped.add(key)
        log.warning(
            "redis_behind_rewinding",
            partition=key[1],
            stored=stored,
            position=self._expected.get(key),
        )
        try:
            self.consumer.seek(TopicPartition(key[0], key[1], _or_beginning(stored)))
        except KafkaException as exc:
            # The expected offset stays ahead of Redis, so the next write is refused and rewinds again.
            log.warning("rewind_seek_failed", partition=key[1], error=str(exc)[:300])
            return
        self._expected[key] = -1 if stored is None else stored

    def _fenced(self, fenced: dict[tuple[str, int], int]) -> None:
        """Another consumer took these partitions over: stop consuming and owning them at once."""
        self.stats.fenced += len(fenced)
        self._dropped.update(fenced)
        tps = [TopicPartition(t, p) for t, p in fenced]
        log.error("fenced", partitions=sorted(p for _, p in fenced), epochs=sorted(set(fenced.values())))
        try:
            self.consumer.pause(tps)
        except KafkaException as exc:
            log.warning("pause_failed", error=str(exc)[:300])
        self._forget(tps, "fenced")

    def _prepare(self, msgs: Sequence[Message]) -> dict[tuple[str, int], _Slot]:
        s = self.settings
        now_s = time.time()
        lo, hi = now_s - s.max_event_age_s, now_s + s.max_clock_skew_s
        max_bytes = s.max_message_bytes
        slots: dict[tuple[str, int], _Slot] = {}
        key: tuple[str, int] | None = None
        slot = _Slot()
        events = slot.events
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.error("consume_error", error=str(err))
                continue
            k: tuple[str, int] = (msg.topic(), msg.partition())  # type: ignore[assignment]
            if k != key:
                key = k
                got = slots.get(k)
                if got is None:
                    got = slots[k] = _Slot()
                slot = got
                events = slot.events
            offset: int = msg.offset()  # type: ignore[assignment]
            slot.next_offset = offset + 1
            value: bytes = msg.value()  # type: ignore[assignment]
            fast = fast_decode(value, lo, hi) if value is not None and len(value) <= max_bytes else None
            if fast is not None:
                events.append(Pending(offset, fast[0], fast[1], fast[2], fast[3], value))
                continue
            decoded = decode(value, s, now_s)
            if type(decoded) is ClickEvent:
                pair = pair_key(decoded.query, decoded.item_id)
                events.append(
                    Pending(offset, decoded.segment, decoded.event_id, decoded.clicked, pair, value)
                )
            else:
                assert isinstance(decoded, Rejection)
                self._dead_letter(msg, decoded)
                slot.dead.append((offset, decoded.code))
                slot.ndead += 1
        self.stats.consumed += len(msgs)
        return slots

    def _send(self, slots: dict[tuple[str, int], _Slot]) -> None:
        self.flush()
        for key in self._dropped:
            slots.pop(key, None)
        self._dropped.clear()
        if not slots:
            return
        if any(slot.ndead for slot in slots.values()):
            self._confirm_dead_letters()
        writes = []
        for key, slot in slots.items():
            writes.append(
                PartitionWrite(
                    key[0],
                    key[1],
                    slot.next_offset,
                    slot.events,
                    slot.dead,
                    epoch=self._epochs.get(key),
                    expected=self._expected.get(key),
                )
            )
            if key in self._expected:
                self._expected[key] = max(self._expected[key], slot.next_offset)
        write = self.buffer.send(writes)
        self._inflight = (write, [(key, slot.next_offset) for key, slot in slots.items()])

    def _dead_letter(self, msg: Message, why: Rejection) -> None:
        record = dead_letter(msg, why.code, why.message, max_record_bytes(self.settings))
        log.warning(
            "dead_letter",
            partition=msg.partition(),
            offset=msg.offset(),
            reason=why.code,
            detail=why.message[:300],
        )
        self.stats.by_code[why.code] = self.stats.by_code.get(why.code, 0) + 1
        while True:
            try:
                self.producer.produce(
                    self.settings.dlq_topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    on_delivery=self._dlq_delivered,
                )
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                self._dlq_errors.append(str(exc))
                return

    def _dlq_delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._dlq_errors.append(str(err))

    def _dead_letters_unconfirmed(self, error: DeadLetterError) -> None:
        """The DLQ did not confirm, so the batch was not written: after a back-off, consume it again from
        the stored offsets (its dead letters are produced again: the DLQ is at-least-once). The loop never
        stops on a produce error, and never stores offsets past dead letters that might be lost."""
        self.stats.dlq_failures += 1
        delay = self._backoff_s()
        log.error("dead_letter_unconfirmed", error=str(error)[:300], retry_in_s=delay)
        self._rewind_owned(delay)

    def _backoff_s(self) -> float:
        """0.5 s after the first failure in a row, twice as long after each next one, at most 30 s."""
        self._failures_in_row += 1
        return float(min(30.0, 0.5 * 2 ** (self._failures_in_row - 1)))

    def _wait_paused(self, seconds: float, stop: threading.Event | None = None) -> list[TopicPartition]:
        """Pause every assigned partition and keep polling for `seconds`, so the group keeps this member."""
        assignment = self.consumer.assignment()
        if assignment:
            self.consumer.pause(assignment)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            self.consumer.consume(1, min(0.5, max(0.0, deadline - time.monotonic())))
            self.producer.poll(0)
        return assignment

    def _rewind_owned(self, pause_s: float, stop: threading.Event | None = None) -> None:
        """Wait `pause_s` paused, then seek every owned partition back to its stored offset and resume."""
        self._inflight = None
        self._wait_paused(pause_s, stop)
        if stop is not None and stop.is_set():
            return
        assignment = [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) in self._epochs]
        by_topic: dict[str, list[int]] = {}
        for tp in assignment:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        for topic, parts in by_topic.items():
            stored = self.buffer.stored_offsets(parts, topic)
            for p in parts:
                offset = stored[p]
                self.consumer.seek(TopicPartition(topic, p, _or_beginning(offset)))
                self._expected[(topic, p)] = -1 if offset is None else offset
        if assignment and not self._paused:
            self.consumer.resume(assignment)

    def redis_writable(self) -> bool:
        """False while Redis refuses writes for lack of memory (`maxmemory` with `noeviction`)."""
        return not self._redis_full

    def _confirm_dead_letters(self) -> None:
        remaining = self.producer.flush(self._block_s)
        if remaining or self._dlq_errors:
            errors, self._dlq_errors = self._dlq_errors, []
            raise DeadLetterError(
                f"dead-letter topic not confirmed: {remaining} pending, errors {errors[:3]}"
            )

    # Backpressure and commits

    def _backpressure(self, full: bool) -> None:
        if full == self._paused:
            return
        assignment = self.consumer.assignment()
        if full:
            self.consumer.pause(assignment)
            log.info(
                "paused", reason="training queue full", partitions=sorted(tp.partition for tp in assignment)
            )
        else:
            self.consumer.resume(assignment)
            log.info("resumed", partitions=sorted(tp.partition for tp in assignment))
        self._paused = full

    @property
    def paused(self) -> bool:
        return self._paused

    def _commit(self, force: bool = False, partitions: set[tuple[str, int]] | None = None) -> None:
        now = time.monotonic()
        if not self._to_commit or (not force and now - self._last_commit < COMMIT_INTERVAL_S):
            return
        offsets = [
            TopicPartition(t, p, o)
            for (t, p), o in self._to_commit.items()
            if partitions is None or (t, p) in partitions
        ]
        self._last_commit = now
        if not offsets:
            return
        try:
            if force:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            log.warning("commit_failed", error=str(exc))
        for tp in offsets:
            self._to_commit.pop((tp.topic, tp.partition), None)

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_LOG_INTERVAL_S:
            self._last_progress = now
            st = self.stats
            log.info(
                "progress",
                consumed=st.consumed,
                added=st.added,
                duplicates=st.duplicates,
                dead=st.dead,
                paused=self._paused,
            )

    def _on_kafka_error(self, err: KafkaError) -> None:
        """librdkafka reports broker trouble here and reconnects by itself; counted and logged."""
        self.stats.kafka_errors += 1
        log.warning("kafka_error", code=err.name(), error=err.str())

    def recover(self, stop: threading.Event, error: Exception) -> None:
        """After a failed Redis call: wait for Redis, then rewind every owned partition to its stored offset.

        The write in flight is dropped and what was consumed but not stored is read again (the write
        script skips offsets already stored, so nothing doubles). Meanwhile the consumer stays paused but
        keeps polling, so this worker keeps its group membership and its partitions. A Redis out of
        memory answers PING but refuses every write: it gets a growing back-off instead of a tight loop,
        and `redis_writable` says so until a write succeeds.
        """
        self._inflight = None
        self.stats.redis_outages += 1
        if isinstance(error, OutOfMemoryError):
            self.stats.redis_oom += 1
            self._redis_full = True
            delay = self._backoff_s()
            log.error("redis_out_of_memory", error=str(error)[:300], retry_in_s=delay)
            self._rewind_owned(delay, stop)
            return
        self._wait_paused(0.0)
        delay = 0.5
        log.warning("redis_unavailable", error=str(error)[:300])
        while not stop.is_set():
            try:
                self.buffer.redis.ping()
                break
            except redis.RedisError as exc:
                log.warning("redis_unavailable", error=str(exc)[:300], retry_in_s=delay)
                self.consumer.consume(1, delay)
                self.producer.poll(0)
                delay = min(delay * 2, 10.0)
        self._rewind_owned(0.0, stop)
        log.info("redis_back", partitions=sorted(self._owned))

    def close(self) -> None:
        """Finish the write in flight, commit, leave the group (revoking commits again), flush the DLQ."""
        try:
            self.flush()
        finally:
            self._close()

    def _close(self) -> None:
        self._commit(force=True)
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("close_failed", error=str(exc))
        self.producer.flush(self._block_s)
        st = self.stats
        log.info(
            "closed",
            consumed=st.consumed,
            added=st.added,
            duplicates=st.duplicates,
            dead=st.dead,
            stale=st.stale,
        )


# `python -m worker ingest`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--idle-exit", type=float, default=None, metavar="S", help="stop after S seconds without messages"
    )
    parser.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    if not args.no_create_topics:
        ensure_topics(settings, [settings.input_topic, settings.dlq_topic])
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        ingestor = Ingestor(settings)  # a Redis Cluster client asks for the slot layout at once
    except redis.RedisError as exc:
        log.error("start-up failed", error=str(exc))
        return 2
    try:
        ingestor.run(stop, idle_exit_s=args.idle_exit)
    except DeadLetterError as exc:
        log.error("dead_letter_unconfirmed", error=str(exc))
        return 1
    return 0
