"""Helpers shared by the consumer-side integration tests (real Kafka, real Redis)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import TopicPartition

from worker.config import Settings
from worker.state.buffer import Buffer
from worker.state.entry import decode_entry
from worker.stream.ingest import Ingestor
from worker.stream.kafka import make_consumer, make_producer


def event_doc(i: int, segment: str, clicked: int | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "event_id": f"e-{i}",
        "ts": datetime.now(UTC).isoformat(),
        "segment": segment,
        "query": f"query {i % 7}",
        "item_id": f"item-{i % 11}",
        "item_text": f"item text {i % 11}",
        "clicked": i % 2 if clicked is None else clicked,
    }
    doc.update(extra)
    return doc


def produce_raw(
    settings: Settings,
    messages: list[tuple[bytes | None, bytes | None]],
    topic: str | None = None,
    headers: list[list[tuple[str, bytes]] | None] | None = None,
) -> None:
    prod = make_producer(settings)
    errors: list[str] = []
    for i, (key, value) in enumerate(messages):
        prod.produce(
            topic or settings.input_topic,
            key=key,
            value=value,
            headers=headers[i] if headers else None,
            on_delivery=lambda err, _m: errors.append(str(err)) if err else None,
        )
        prod.poll(0)
    assert prod.flush(30) == 0
    assert not errors, errors


def produce_docs(settings: Settings, docs: list[dict[str, Any]]) -> None:
    produce_raw(settings, [(d["segment"].encode(), orjson.dumps(d)) for d in docs])


def high_watermarks(settings: Settings, topic: str | None = None) -> dict[int, int]:
    name = topic or settings.input_topic
    consumer = make_consumer(settings, **{"group.id": f"{settings.group_id}-probe"})
    try:
        meta = consumer.list_topics(name, timeout=10)
        parts = sorted(meta.topics[name].partitions)
        return {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts}
    finally:
        consumer.close()


def caught_up(settings: Settings, buffer: Buffer, marks: dict[int, int] | None = None) -> bool:
    marks = marks if marks is not None else high_watermarks(settings)
    stored = buffer.stored_offsets(marks)
    return all((stored[p] or 0) >= end for p, end in marks.items())


def ingest_all(settings: Settings, timeout_s: float = 60.0, **kwargs: Any) -> Ingestor:
    """Run an ingestor until Redis holds offsets up to the topic's end, then close it."""
    ingestor = Ingestor(settings, **kwargs)
    marks = high_watermarks(settings)
    ingestor.subscribe()
    deadline = time.monotonic() + timeout_s
    try:
        while not caught_up(settings, ingestor.buffer, marks):
            assert time.monotonic() < deadline, (
                f"not caught up: {ingestor.buffer.stored_offsets(marks)} < {marks}"
            )
            ingestor.poll_once()
    finally:
        ingestor.close()
    return ingestor


def consume_all(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = make_consumer(settings, **{"group.id": f"{settings.group_id}-reader"})
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            out += [m for m in consumer.consume(500, 0.5) if m.error() is None]
        extra_deadline = time.monotonic() + 1.0
        while time.monotonic() < extra_deadline:
            out += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return out


def total_stats(buffer: Buffer, partitions: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in range(partitions):
        for k, v in buffer.partition_stats(p).items():
            out[k] = out.get(k, 0) + v
    return out


def stored_event_ids(buffer: Buffer, partitions: int) -> list[str]:
    """Every event id in the sample lists (the sample cap is above what these tests produce)."""
    ids = []
    for p in range(partitions):
        for seg in buffer.segments(p):
            for raw in buffer.redis.lrange(buffer.segment_key(p, seg, "sample"), 0, -1):
                ids.append(orjson.loads(decode_entry(raw)[1])["event_id"])
    return ids


class Background(threading.Thread):
    """Runs an ingestor's loop in a thread until `stop` is set."""

    def __init__(self, ingestor: Ingestor) -> None:
        super().__init__(daemon=True)
        self.ingestor = ingestor
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.ingestor.run(self.stop)
        except BaseException as exc:
            self.error = exc
