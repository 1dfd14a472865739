"""The publisher against the real broker: what it says it delivered can be read back."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import orjson
import pytest
from confluent_kafka import Consumer

from worker.config import Settings
from worker.events import HoldoutMetrics, ModelVersionEvent, ScoreUpdate
from worker.stream.kafka import ensure_topics, make_producer, producer_config
from worker.stream.publish import Publisher, PublishError

pytestmark = pytest.mark.integration


def _read(
    settings: Settings, topic: str, n: int, timeout_s: float = 60
) -> list[tuple[bytes, dict[str, object]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"read-{topic}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    out: list[tuple[bytes, dict[str, object]]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            if msg.error() is None:
                out.append((msg.key(), orjson.loads(msg.value())))
    consumer.close()
    return out


def test_scores_and_versions_round_trip(settings: Settings) -> None:
    ensure_topics(settings, [settings.scores_topic, settings.versions_topic], partitions=2)
    pub = Publisher(settings)
    now = datetime.now(UTC)
    updates = [
        ScoreUpdate(
            segment="GE", query=f"q{i}", item_id=str(i), score=i / 2500, model_version=3, scored_at=now
        )
        for i in range(2500)
    ]
    assert pub.scores(updates) == 2500
    pub.version(
        ModelVersionEvent(
            segment="GE",
            version=3,
            parent_version=2,
            decision="promoted",
            base_model="m",
            events_from=1,
            events_to=40,
            challenger=HoldoutMetrics(auc=0.7, logloss=0.6, n=10),
            champion=None,
            device="cpu",
            train_seconds=1.5,
            created_at=now,
        )
    )
    pub.flush(30)
    assert pub.stats()["delivered"] == 2501 and pub.stats()["failed"] == 0
    scores = _read(settings, settings.scores_topic, 2500)
    assert len(scores) == 2500
    assert {k for k, _ in scores} == {b"GE"}
    assert sorted(float(v["score"]) for _, v in scores) == sorted(u.score for u in updates)  # type: ignore[arg-type]
    versions = _read(settings, settings.versions_topic, 1)
    assert versions[0][1]["version"] == 3 and versions[0][1]["decision"] == "promoted"


def test_publisher_producer_is_idempotent_with_acks_all(settings: Settings) -> None:
    pc = producer_config(settings)
    assert pc["enable.idempotence"] is True and pc["acks"] == "all"


def test_failed_delivery_is_reported_not_hidden(settings: Settings) -> None:
    """An incompressible message over the broker's 1 MB limit fails delivery; flush must say so."""
    ensure_topics(settings, [settings.scores_topic], partitions=1)
    pub = Publisher(settings, make_producer(settings, **{"message.max.bytes": 4_000_000}))
    pub._produce(settings.scores_topic, b"k", os.urandom(2_000_000))
    with pytest.raises(PublishError, match="failed delivery"):
        pub.flush(30)
    assert pub.stats()["failed"] == 1
    pub.flush(5)
