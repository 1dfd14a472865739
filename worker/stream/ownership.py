"""Which input partitions this worker owns, under which owner epoch, and where each continues from.

Ownership is fenced: on assignment the consumer takes a new owner epoch per partition
(`Buffer.acquire`), and every write carries it, so a zombie (a process that still believes it owns a
partition the group moved) has its writes refused and stops treating the partition as its own. Every
write also carries the stored offset the consumer continues from (`expected`): when Redis comes back
behind it (a failover to a lagging replica, an AOF that lost its last second, a restore), the write is
refused and the consumer seeks back to what Redis holds, so the events in between are buffered again,
not lost.

An assigned partition whose Redis reads failed waits in `unacquired`, paused, until `take` succeeds:
nothing is consumed from a partition before its ownership is taken. The rebalance callbacks that drive
this are the `Ingestor`'s (`worker.stream.ingest`): they order it with the write in flight and commits.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from worker.state.buffer import Buffer
from worker.stream.trigger import Trigger

log = structlog.get_logger(__name__)


def or_beginning(offset: int | None) -> int:
    """A stored next offset as a consumer position (nothing stored: the partition's beginning)."""
    return OFFSET_BEGINNING if offset is None else offset


class Ownership:
    """The ingest thread keeps this; `owned` is replaced whole, never changed in place, so any thread
    may read it."""

    def __init__(self, buffer: Buffer, trigger: Trigger | None) -> None:
        self.buffer = buffer
        self.trigger = trigger
        self.owned: frozenset[int] = frozenset()
        self.epochs: dict[tuple[str, int], int] = {}
        self.expected: dict[tuple[str, int], int] = {}
        """(topic, partition) -> the stored next offset the next write continues from (-1: none)."""
        self.unacquired: dict[tuple[str, int], TopicPartition] = {}
        """Assigned, but ownership not yet taken in Redis (it failed): kept paused until it succeeds."""

    def assigning(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            self.unacquired[(tp.topic, tp.partition)] = TopicPartition(tp.topic, tp.partition)

    def take(self) -> list[TopicPartition]:
        """New owner epochs and the stored offsets of the unacquired partitions, which it leaves empty."""
        wanted = list(self.unacquired)
        by_topic: dict[str, list[int]] = {}
        for topic, p in wanted:
            by_topic.setdefault(topic, []).append(p)
        positioned = []
        for topic, parts in by_topic.items():
            for p, (epoch, stored) in self.buffer.acquire(parts, topic).items():
                self.epochs[(topic, p)] = epoch
                self.continues_from((topic, p), stored)
                positioned.append(TopicPartition(topic, p, or_beginning(stored)))
        for key in wanted:
            self.unacquired.pop(key, None)
        return positioned

    def taken(self, positioned: list[TopicPartition]) -> None:
        """The consumer is positioned on them: they are this worker's now."""
        self.owned = self.owned | {tp.partition for tp in positioned}
        log.info(
            "assigned",
            partitions=sorted(tp.partition for tp in positioned),
            offsets=[tp.offset for tp in positioned],
            epochs=[self.epochs[(tp.topic, tp.partition)] for tp in positioned],
        )
        if self.trigger is not None:
            self.trigger.assigned(tp.partition for tp in positioned)

    def continues_from(self, key: tuple[str, int], stored: int | None) -> None:
        """The consumer is positioned at `stored`: the next write of `key` must find it in Redis."""
        self.expected[key] = -1 if stored is None else stored

    def advanced(self, key: tuple[str, int], next_offset: int) -> None:
        """A write up to `next_offset` was sent: the one after it continues from there."""
        if key in self.expected:
            self.expected[key] = max(self.expected[key], next_offset)

    def forget(self, partitions: list[TopicPartition], why: str) -> set[int]:
        """Drop `partitions` whatever their state (logged as `why`); returns their numbers."""
        gone = {tp.partition for tp in partitions}
        self.owned = self.owned - gone
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self.epochs.pop(key, None)
            self.expected.pop(key, None)
            self.unacquired.pop(key, None)
        if self.trigger is not None:
            self.trigger.revoked(gone)
        log.info(why, partitions=sorted(gone))
        return gone
