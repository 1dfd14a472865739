"""Which process of the group trains the shared model: the one Kafka gives the lease partition to.

The lease is the single partition of `Settings.lease_topic`, consumed by every worker in a consumer group
of its own (`<group_id>-shared-trainer`). Kafka's group protocol gives that partition to exactly one live
member and moves it when the member dies (session timeout) or leaves (drain), so the election is
Kafka's, not a lock of ours. The range assignor's eager rebalance revokes before it assigns, and the
revoke callback waits (`before_revoke`) for a shared training still running, so two shared trainings
never overlap in the group; the registry's fenced promotion covers a trainer that outlived its lease
anyway (a missed session timeout).

No message is ever produced to the lease topic; polling it only serves the group protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from confluent_kafka import Consumer, KafkaError, TopicPartition

from worker.config import Settings
from worker.stream.kafka import make_consumer

log = structlog.get_logger(__name__)


class Lease:
    def __init__(self, settings: Settings, before_revoke: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.before_revoke = before_revoke
        overrides: dict[str, object] = {"group.id": f"{settings.group_id}-shared-trainer"}
        if settings.group_instance_id:
            overrides["group.instance.id"] = f"{settings.group_instance_id}-shared-trainer"
        self.consumer = make_consumer(settings, **overrides)
        self._held = threading.Event()

    def subscribe(self) -> None:
        self.consumer.subscribe(
            [self.settings.lease_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def held(self) -> bool:
        """True while this process is the group's shared trainer (read from any thread)."""
        return self._held.is_set()

    def poll(self) -> None:
        """Serve the group protocol (rebalance callbacks run here); never blocks."""
        for msg in self.consumer.consume(1, 0):
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                log.warning("lease consumer error", error=str(err))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            self._held.set()
            log.info("shared trainer: lease acquired", topic=self.settings.lease_topic)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions and self._held.is_set():
            self.before_revoke()
            self._held.clear()
            log.info("shared trainer: lease released", topic=self.settings.lease_topic)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._held.clear()
        log.warning("shared trainer: lease lost", topic=self.settings.lease_topic)

    def close(self) -> None:
        """Leave the group, so a survivor takes the lease at once rather than after a session timeout."""
        self.consumer.close()
        self._held.clear()
