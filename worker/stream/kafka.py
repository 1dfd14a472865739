"""Kafka clients built from `Settings`: one place for bootstrap servers, security and client defaults."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from worker.config import Settings

_LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
"""librdkafka's own log lines, which it would write raw to stderr, go through `logging` (JSON) instead."""


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection and security settings shared by every client; SASL only when the protocol asks for it."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    return conf


def consumer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Offsets come from Redis: Kafka never auto-commits or auto-stores them; its commits feed lag only."""
    conf = client_config(settings)
    conf.update(
        {
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "max.poll.interval.ms": settings.max_poll_interval_ms,
            "session.timeout.ms": settings.session_timeout_ms,
            "partition.assignment.strategy": "range",
            "fetch.max.bytes": max(52_428_800, settings.max_message_bytes * 4),
            "queued.max.messages.kbytes": 65_536,
            "logger": _LIBRDKAFKA_LOG,
        }
    )
    if settings.group_instance_id:
        conf["group.instance.id"] = settings.group_instance_id
    conf.update(overrides)
    return conf


def max_record_bytes(settings: Settings) -> int:
    """The largest record this worker produces: Kafka's default topic limit (1 MiB), or room for four
    of the largest accepted events."""
    return max(1_048_576, settings.max_message_bytes * 4)


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks=all: a retried produce never duplicates or reorders within a partition."""
    conf = client_config(settings)
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            "message.max.bytes": max_record_bytes(settings),
            "logger": _LIBRDKAFKA_LOG,
        }
    )
    conf.update(overrides)
    return conf


def make_consumer(settings: Settings, **overrides: Any) -> Consumer:
    return Consumer(consumer_config(settings, **overrides))


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    return Producer(producer_config(settings, **overrides))


def make_admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def ensure_topics(
    settings: Settings, names: Iterable[str], partitions: int | None = None, timeout_s: float = 30.0
) -> list[str]:
    """Create the missing topics; returns those this call created. Existing topics are left as they are."""
    admin = make_admin(settings)
    wanted = list(dict.fromkeys(names))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [n for n in wanted if n not in existing]
    if not missing:
        return []
    count = partitions or settings.topic_partitions
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=count, replication_factor=-1) for n in missing], request_timeout=timeout_s
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    _wait_for_metadata(admin, created, timeout_s)
    return created


def _wait_for_metadata(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    """Topic creation returns before every broker knows the topic; producing at once would warn or fail."""
    deadline = time.monotonic() + timeout_s
    while names and time.monotonic() < deadline:
        topics = admin.list_topics(timeout=timeout_s).topics
        if all(n in topics and topics[n].error is None and topics[n].partitions for n in names):
            return
        time.sleep(0.1)


def partition_count(settings: Settings, topic: str, timeout_s: float = 10.0) -> int:
    meta = make_admin(settings).list_topics(topic=topic, timeout=timeout_s)
    info = meta.topics.get(topic)
    if info is None or info.error is not None:
        raise KafkaException(info.error if info is not None else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    return len(info.partitions)
