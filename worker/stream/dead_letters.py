"""Sending the input's rejected messages to the dead-letter topic, confirmed before their offsets move.

Dead letters are produced, then confirmed by a producer flush (`confirm`), *before* the Redis write that
covers their offsets. A crash between the two re-dead-letters the message after restart: the DLQ is
at-least-once. If the DLQ cannot be confirmed within a tenth of `max.poll.interval.ms`, `confirm` raises
`DeadLetterError` rather than let offsets past dead letters that might be lost be stored; the loop then
consumes the batch again (`worker.stream.recovery`). The record format is `worker.stream.dlq`.
"""

from __future__ import annotations

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from worker.config import Settings
from worker.stream.decode import Rejection
from worker.stream.dlq import dead_letter
from worker.stream.kafka import max_record_bytes

log = structlog.get_logger(__name__)


class DeadLetterError(RuntimeError):
    """The dead-letter topic did not confirm in time; offsets past those messages must not be stored."""


class DeadLetters:
    """Produces dead letters to `settings.dlq_topic` and keeps every produce or delivery error until
    `confirm`, so one lost dead letter holds back the whole batch's offsets."""

    def __init__(self, settings: Settings, producer: Producer) -> None:
        self.settings = settings
        self.producer = producer
        self._errors: list[str] = []

    def send(self, msg: Message, why: Rejection) -> None:
        """Produce the dead letter of `msg`; a full local queue is drained, never dropped."""
        record = dead_letter(msg, why.code, why.message, max_record_bytes(self.settings))
        log.warning(
            "dead_letter",
            partition=msg.partition(),
            offset=msg.offset(),
            reason=why.code,
            detail=why.message[:300],
        )
        while True:
            try:
                self.producer.produce(
                    self.settings.dlq_topic,
                    value=record.value,
                    key=record.key,
                    headers=record.headers,
                    on_delivery=self._delivered,
                )
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                self._errors.append(str(exc))
                return

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))

    def confirm(self, timeout_s: float) -> None:
        """Wait until every dead letter sent so far is delivered; `DeadLetterError` if one is not."""
        remaining = self.producer.flush(timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors, []
            raise DeadLetterError(
                f"dead-letter topic not confirmed: {remaining} pending, errors {errors[:3]}"
            )
