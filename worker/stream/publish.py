"""The producer side: refreshed scores, model-version events and dead-lettered score requests, with
delivery reports checked.

One idempotent producer (`enable.idempotence`, `acks=all`) serves every output topic. Delivery failures are
counted and logged, and `flush` reports them, so a caller never believes lost output was published.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import structlog
from confluent_kafka import KafkaError, Message, Producer

from worker.config import Settings
from worker.events import ModelVersionEvent, ScoreUpdate
from worker.stream.dlq import Header, dead_letter
from worker.stream.kafka import make_producer, max_record_bytes

log = structlog.get_logger(__name__)


class PublishError(RuntimeError):
    """Some output could not be delivered (after the producer's own retries)."""


class Publisher:
    def __init__(self, settings: Settings, producer: Producer | None = None) -> None:
        self.settings = settings
        self.producer = producer or make_producer(settings)
        self._lock = threading.Lock()
        self.delivered = 0
        self.failed = 0
        self.last_error: str | None = None
        self._failed_seen = 0

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        with self._lock:
            if err is None:
                self.delivered += 1
                return
            self.failed += 1
            self.last_error = str(err)
        log.error("delivery failed", topic=msg.topic(), error=str(err))

    def _produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[Header] | None = None
    ) -> None:
        """Produce, serving delivery reports when the local queue is full instead of failing."""
        while True:
            try:
                self.producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=self._on_delivery
                )
                return
            except BufferError:
                self.producer.poll(0.1)

    def scores(self, updates: Sequence[ScoreUpdate]) -> int:
        """Queue score updates on the scores topic, keyed by segment; returns how many were queued."""
        topic = self.settings.scores_topic
        for i, update in enumerate(updates):
            self._produce(topic, update.segment.encode(), update.to_json())
            if i % 1000 == 999:
                self.producer.poll(0)
        self.producer.poll(0)
        return len(updates)

    def version(self, event: ModelVersionEvent) -> None:
        self._produce(self.settings.versions_topic, event.segment.encode(), event.to_json())
        self.producer.poll(0)

    def dead_letter(self, msg: Message, reason: str, message: str) -> None:
        """Send a consumed message this worker could not handle to the dead-letter topic, in the format
        of `worker.stream.dlq`: its producer finds it there instead of waiting for an answer."""
        record = dead_letter(msg, reason, message, max_record_bytes(self.settings))
        self._produce(self.settings.dlq_topic, record.key, record.value, record.headers)
        self.producer.poll(0)

    def poll(self, timeout: float = 0.0) -> int:
        return int(self.producer.poll(timeout))

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything queued is delivered; raise if anything failed since the last flush."""
        remaining = int(self.producer.flush(timeout))
        if remaining:
            raise PublishError(f"{remaining} messages still undelivered after {timeout:.0f} s")
        with self._lock:
            new_failures, self._failed_seen = self.failed - self._failed_seen, self.failed
        if new_failures:
            raise PublishError(f"{new_failures} messages failed delivery; last error: {self.last_error}")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"delivered": self.delivered, "failed": self.failed, "queued": len(self.producer)}
