"""Kafka offset commits of the input partitions: they feed lag monitoring, never correctness.

The consumer continues from the offsets stored in Redis with the events (`worker.state.buffer`), so a
commit that is lost or late neither loses nor doubles an event. Only an offset whose Redis write is done
is committed: asynchronously, at most once per `COMMIT_INTERVAL_S`, and synchronously on revoke and
close. A failed commit is logged and dropped.
"""

from __future__ import annotations

import time

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

log = structlog.get_logger(__name__)

COMMIT_INTERVAL_S = 1.0


class Commits:
    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self._to_commit: dict[tuple[str, int], int] = {}
        self._last_commit = 0.0

    def stored(self, key: tuple[str, int], next_offset: int) -> None:
        """Redis holds `key` up to `next_offset`: commit it with the next `commit`."""
        self._to_commit[key] = next_offset

    def forget(self, gone: set[int]) -> None:
        """The partitions numbered `gone` are no longer this worker's: commit nothing more of them."""
        for key in [k for k in self._to_commit if k[1] in gone]:
            del self._to_commit[key]

    def commit(self, force: bool = False, partitions: set[tuple[str, int]] | None = None) -> None:
        """Commit what is stored (of `partitions` only, if given); `force`: now, and wait for it."""
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
