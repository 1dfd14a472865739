"""A score request the worker cannot answer reaches the dead-letter topic with its reason, instead of
vanishing: real Kafka, an in-process worker whose scoring raises (no model is loaded)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer

from worker.app import Worker
from worker.config import Settings
from worker.stream.kafka import client_config, ensure_topics

pytestmark = pytest.mark.integration


class _BrokenScorer:
    """Stands in for `Learner`: every scoring raises."""

    shared = None
    shared_version = 0

    def serving(self, segment: str) -> Any:
        raise RuntimeError(f"no model for {segment}")

    def score(self, segment: str, pairs: Any, folds: Any = None, serving: Any = None) -> Any:
        raise RuntimeError(f"no model for {segment}")


def _dead_letters(settings: Settings, n: int, timeout_s: float = 60) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": f"read-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.dlq_topic])
    out: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < n and time.monotonic() < deadline:
            for msg in consumer.consume(10, 0.5):
                if msg.error() is None:
                    headers = {k: bytes(v or b"") for k, v in msg.headers() or []}
                    out.append((msg.value() or b"", headers))
    finally:
        consumer.close()
    return out


def test_failed_and_invalid_score_requests_go_to_the_dlq_with_their_reason(settings: Settings) -> None:
    ensure_topics(settings, [settings.requests_topic, settings.dlq_topic, settings.scores_topic])
    failing = orjson.dumps(
        {
            "request_id": "r-fails",
            "segment": "GE",
            "pairs": [{"query": "bulb", "item_id": "x1", "item_text": "GE light bulb"}],
        }
    )
    invalid = orjson.dumps({"request_id": "r-invalid", "segment": "GE", "pairs": []})
    producer = Producer(client_config(settings))
    producer.produce(settings.requests_topic, key=b"GE", value=failing)
    producer.produce(settings.requests_topic, key=b"GE", value=invalid)
    assert producer.flush(10) == 0

    worker = Worker(settings)
    worker.learner = _BrokenScorer()  # type: ignore[assignment]
    try:
        worker.request_consumer.subscribe([settings.requests_topic])
        deadline = time.monotonic() + 60
        while worker.requests.qsize() < 2:
            assert time.monotonic() < deadline, "the requests never arrived"
            worker.scoring.poll_requests()
            time.sleep(0.1)
        worker._compute_once()
        worker._compute_once()
        worker.publisher.flush(10)
        assert worker.requests.empty()

        letters = {value: headers for value, headers in _dead_letters(settings, 2)}
        assert set(letters) == {failing, invalid}, "both requests reach the DLQ, as they came"
        assert letters[failing]["dlq.reason"] == b"scoring_failed"
        assert b"no model for GE" in letters[failing]["dlq.message"]
        assert letters[invalid]["dlq.reason"] == b"invalid_request"
        assert b"pairs" in letters[invalid]["dlq.message"]
        for headers in letters.values():
            assert headers["dlq.source.topic"] == settings.requests_topic.encode()
            assert int(headers["dlq.source.offset"]) >= 0

        text = worker.metrics.render().decode()
        assert 'ctr_worker_score_requests_total{outcome="failed"} 1.0' in text
        assert 'ctr_worker_score_requests_total{outcome="rejected"} 1.0' in text
        assert 'ctr_worker_score_requests_total{outcome="answered"} 0.0' in text
        worker.request_consumer.commit(asynchronous=False)
        stored = worker.request_consumer.committed(worker.request_consumer.assignment(), timeout=10)
        assert sum(tp.offset for tp in stored if tp.offset >= 0) == 2, "both offsets stored: no retry loop"
    finally:
        worker.request_consumer.close()
        worker.lease.close()
