"""Reading the dead-letter topic without disturbing anything: for `dlq list` and `dlq redrive`.

The reader assigns partitions itself (no group membership, no rebalance) under a throwaway group id, never
commits, and reads each partition from a start offset up to the high watermark it saw when it began: what
arrives later is left for the next run, so a read always ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Generator, Mapping

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from worker.config import Settings
from worker.stream.dlq import DeadLetterRecord, read_dead_letter
from worker.stream.kafka import make_consumer

IDLE_TIMEOUT_S = 30.0
"""A read that gets nothing for this long before the high watermark fails instead of hanging."""


class DlqReadError(RuntimeError):
    """The DLQ could not be read to its end: no such topic, or the broker did not answer."""


def dlq_partitions(consumer: Consumer, topic: str, timeout_s: float = 10.0) -> list[int]:
    meta = consumer.list_topics(topic, timeout=timeout_s)
    info = meta.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise DlqReadError(f"topic {topic!r} does not exist (WORKER_DLQ_TOPIC)")
    return sorted(info.partitions)


def reader(settings: Settings) -> Consumer:
    """A consumer that joins no group and commits nothing: only `assign` is ever called on it."""
    return make_consumer(
        settings,
        **{"group.id": f"{settings.group_id}-dlq-tool-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False},
    )


def read_dlq(
    settings: Settings, starts: Mapping[int, int] | None = None, idle_timeout_s: float = IDLE_TIMEOUT_S
) -> Generator[DeadLetterRecord]:
    """Every DLQ record from `starts[p]` (default: the oldest kept) up to the high watermark as it was when
    the read began, in offset order within a partition. Closing the iterator closes the consumer."""
    topic = settings.dlq_topic
    consumer = reader(settings)
    try:
        ends: dict[int, int] = {}
        assignment = []
        for part in dlq_partitions(consumer, topic):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
            start = max(low, (starts or {}).get(part, low))
            if start < high:
                ends[part] = high
                assignment.append(TopicPartition(topic, part, start))
        if not assignment:
            return
        consumer.assign(assignment)
        last_progress = time.monotonic()
        while ends:
            msgs = consumer.consume(500, 0.5)
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise DlqReadError(f"reading {topic}: {err}")
                    continue
                p: int = msg.partition()  # type: ignore[assignment]
                offset: int = msg.offset()  # type: ignore[assignment]
                end = ends.get(p)
                if end is None or offset >= end:
                    continue
                last_progress = time.monotonic()
                yield read_dead_letter(msg)
                if offset + 1 >= end:
                    del ends[p]
            if not msgs:
                _drop_finished(consumer, topic, ends)
                if ends and time.monotonic() - last_progress > idle_timeout_s:
                    raise DlqReadError(f"reading {topic}: nothing for {idle_timeout_s:g} s before {ends}")
    except KafkaException as exc:
        raise DlqReadError(f"reading {topic}: {exc}") from exc
    finally:
        consumer.close()


def _drop_finished(consumer: Consumer, topic: str, ends: dict[int, int]) -> None:
    """A partition whose position passed its end without a last record (a compacted or aborted tail)."""
    for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
        if tp.offset >= 0 and tp.offset >= ends[tp.partition]:
            del ends[tp.partition]
