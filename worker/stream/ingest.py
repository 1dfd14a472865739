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

Ownership is fenced by owner epochs and by the stored offset each write continues from
(`worker.stream.ownership`). The rebalance callbacks never leave ownership half-changed: a revoke forgets
its partitions whatever fails on the way, and an assignment whose Redis reads fail is kept paused until
they succeed.

Dead letters are confirmed *before* the Redis write that covers their offsets
(`worker.stream.dead_letters`). When a batch cannot be stored (Redis fails, the DLQ does not confirm),
the loop waits paused and consumes again from the stored offsets (`worker.stream.recovery`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis
import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from redis.exceptions import OutOfMemoryError  # type: ignore[attr-defined]  # not in the stubs

from worker.config import Settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer, InflightWrite, PartitionWrite, Pending, WriteResult
from worker.state.entry import pair_key
from worker.stream.commits import Commits
from worker.stream.dead_letters import DeadLetterError, DeadLetters
from worker.stream.decode import Rejection, decode, fast_decode
from worker.stream.kafka import make_consumer, make_producer
from worker.stream.ownership import Ownership, or_beginning
from worker.stream.recovery import Recovery
from worker.stream.trigger import Trigger

log = structlog.get_logger(__name__)

PROGRESS_LOG_INTERVAL_S = 10.0


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
        self.ownership = Ownership(self.buffer, trigger)
        self.dead_letters = DeadLetters(settings, self.producer)
        self._paused = False
        self.recovery = Recovery(
            self.consumer, self.producer, self.buffer, self.ownership, paused=lambda: self._paused
        )
        self.commits = Commits(self.consumer)
        self._last_progress = time.monotonic()
        self._subscribed = False
        self._block_s = min(30.0, settings.max_poll_interval_ms / 1000 / 10)
        self._inflight: tuple[InflightWrite, list[tuple[tuple[str, int], int]]] | None = None
        self._dropped: set[tuple[str, int]] = set()
        """Partitions whose batch, consumed before a rewind or a fence, must not be written."""

    # Ownership and rebalancing

    def owned_partitions(self) -> frozenset[int]:
        """Input partitions assigned to this worker right now (read from any thread)."""
        return self.ownership.owned

    def epoch(self, partition: int) -> int | None:
        """The owner epoch this worker holds a partition of the input topic under (None: not owned)."""
        return self.ownership.epochs.get((self.settings.input_topic, partition))

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
        self.ownership.assigning(partitions)
        try:
            positioned = self.ownership.take()
        except Exception as exc:
            unacquired = sorted(self.ownership.unacquired)
            log.error("assign_failed_retrying", error=str(exc)[:300], partitions=unacquired)
            consumer.assign(partitions)
            consumer.pause(partitions)
            return
        consumer.assign(positioned)
        if self._paused and positioned:
            consumer.pause(positioned)
        self.ownership.taken(positioned)

    def _acquire(self) -> None:
        """Finish an assignment whose Redis reads failed: seek to the stored offsets, then resume."""
        positioned = self.ownership.take()
        for tp in positioned:
            self.consumer.seek(tp)
        if not self._paused:
            self.consumer.resume(positioned)
        self.ownership.taken(positioned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Let a running training of these partitions finish, store and commit what was consumed; and
        whatever of that fails, forget the partitions, so nothing of theirs is trained here any more."""
        try:
            if self.before_revoke is not None:
                self.before_revoke({tp.partition for tp in partitions})
            self.flush()
            self.commits.commit(force=True, partitions={(tp.topic, tp.partition) for tp in partitions})
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
        self.commits.forget(self.ownership.forget(partitions, why))

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
                elif idle_exit_s is not None and self.ownership.owned and now - last_message > idle_exit_s:
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
        if self.ownership.unacquired:
            self._acquire()
        msgs = self.consumer.consume(s.consume_batch, s.consume_timeout_s)
        if msgs:
            try:
                self._send(self._prepare(msgs))
            except DeadLetterError as exc:
                self.stats.dlq_failures += 1
                self._inflight = None
                self.recovery.dead_letters_unconfirmed(exc)
                return len(msgs)
        else:
            self.flush()
        self.producer.poll(0)
        if self.trigger is not None:
            self.trigger.tick()
            self._backpressure(self.trigger.backlogged)
        self.commits.commit()
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
        self.recovery.stored()
        for key, next_offset in slots:
            if key not in result.fenced and key not in result.rewound:
                self.commits.stored(key, next_offset)
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
            position=self.ownership.expected.get(key),
        )
        try:
            self.consumer.seek(TopicPartition(key[0], key[1], or_beginning(stored)))
        except KafkaException as exc:
            # The expected offset stays ahead of Redis, so the next write is refused and rewinds again.
            log.warning("rewind_seek_failed", partition=key[1], error=str(exc)[:300])
            return
        self.ownership.continues_from(key, stored)

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
                self.stats.by_code[decoded.code] = self.stats.by_code.get(decoded.code, 0) + 1
                self.dead_letters.send(msg, decoded)
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
            self.dead_letters.confirm(self._block_s)
        writes = []
        for key, slot in slots.items():
            writes.append(
                PartitionWrite(
                    key[0],
                    key[1],
                    slot.next_offset,
                    slot.events,
                    slot.dead,
                    epoch=self.ownership.epochs.get(key),
                    expected=self.ownership.expected.get(key),
                )
            )
            self.ownership.advanced(key, slot.next_offset)
        write = self.buffer.send(writes)
        self._inflight = (write, [(key, slot.next_offset) for key, slot in slots.items()])

    def redis_writable(self) -> bool:
        """False while Redis refuses writes for lack of memory (`maxmemory` with `noeviction`)."""
        return not self.recovery.redis_full

    # Backpressure, progress

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
            self.recovery.out_of_memory(error, stop)
        else:
            self.recovery.unavailable(error, stop)

    def close(self) -> None:
        """Finish the write in flight, commit, leave the group (revoking commits again), flush the DLQ."""
        try:
            self.flush()
        finally:
            self._close()

    def _close(self) -> None:
        self.commits.commit(force=True)
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
