"""When a batch could not be stored: wait with the partitions paused, then consume again from Redis's offsets.

Two things stop a batch: Redis failed (down, or out of memory), or the dead-letter topic did not confirm
(`worker.stream.dead_letters`). Either way the write in flight is dropped and every owned partition is
sought back to the offset Redis holds, so what was consumed but not stored is read again (the write
script skips offsets already stored, so nothing doubles; dead letters are produced again: the DLQ is
at-least-once). Meanwhile the consumer stays paused but keeps polling, so this worker keeps its group
membership and its partitions. The loop never stops on such a failure, and never stores offsets past
dead letters that might be lost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import redis
import structlog
from confluent_kafka import Consumer, Producer, TopicPartition

from worker.state.buffer import Buffer
from worker.stream.dead_letters import DeadLetterError
from worker.stream.ownership import Ownership, or_beginning

log = structlog.get_logger(__name__)


class Recovery:
    """Run on the ingest thread, after the `Ingestor` dropped its write in flight; `paused` says whether
    backpressure holds the input paused (then it stays paused after a rewind)."""

    def __init__(
        self,
        consumer: Consumer,
        producer: Producer,
        buffer: Buffer,
        ownership: Ownership,
        paused: Callable[[], bool],
    ) -> None:
        self.consumer = consumer
        self.producer = producer
        self.buffer = buffer
        self.ownership = ownership
        self.paused = paused
        self.failures_in_row = 0
        self.redis_full = False
        """True while Redis refuses writes for lack of memory (`maxmemory` with `noeviction`)."""

    def stored(self) -> None:
        """A write went through: the back-off starts over, and Redis takes writes again."""
        self.failures_in_row = 0
        self.redis_full = False

    def dead_letters_unconfirmed(self, error: DeadLetterError) -> None:
        """The DLQ did not confirm, so the batch was not written: after a back-off, consume it again."""
        delay = self._backoff_s()
        log.error("dead_letter_unconfirmed", error=str(error)[:300], retry_in_s=delay)
        self._rewind_owned(delay)

    def out_of_memory(self, error: Exception, stop: threading.Event) -> None:
        """Redis answers PING but refuses every write: a growing back-off instead of a tight loop."""
        self.redis_full = True
        delay = self._backoff_s()
        log.error("redis_out_of_memory", error=str(error)[:300], retry_in_s=delay)
        self._rewind_owned(delay, stop)

    def unavailable(self, error: Exception, stop: threading.Event) -> None:
        """Wait until Redis answers again (or `stop`), then rewind."""
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
        log.info("redis_back", partitions=sorted(self.ownership.owned))

    def _backoff_s(self) -> float:
        """0.5 s after the first failure in a row, twice as long after each next one, at most 30 s."""
        self.failures_in_row += 1
        return float(min(30.0, 0.5 * 2 ** (self.failures_in_row - 1)))

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
        self._wait_paused(pause_s, stop)
        if stop is not None and stop.is_set():
            return
        owned = self.ownership.epochs
        assignment = [tp for tp in self.consumer.assignment() if (tp.topic, tp.partition) in owned]
        by_topic: dict[str, list[int]] = {}
        for tp in assignment:
            by_topic.setdefault(tp.topic, []).append(tp.partition)
        for topic, parts in by_topic.items():
            stored = self.buffer.stored_offsets(parts, topic)
            for p in parts:
                offset = stored[p]
                self.consumer.seek(TopicPartition(topic, p, or_beginning(offset)))
                self.ownership.continues_from((topic, p), offset)
        if assignment and not self.paused():
            self.consumer.resume(assignment)
