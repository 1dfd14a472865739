"""Client configuration from settings, and topic creation against the real broker."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from worker.config import Settings
from worker.stream.kafka import (
    client_config,
    consumer_config,
    ensure_topics,
    make_admin,
    partition_count,
    producer_config,
)


def test_plaintext_has_no_sasl_keys() -> None:
    conf = client_config(Settings(kafka_bootstrap="a:1,b:2"))
    assert conf == {"bootstrap.servers": "a:1,b:2", "security.protocol": "PLAINTEXT"}


def test_sasl_settings_reach_every_client() -> None:
    s = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="u",
        kafka_sasl_password=SecretStr("p"),
    )
    for conf in (client_config(s), consumer_config(s), producer_config(s)):
        assert conf["security.protocol"] == "SASL_SSL"
        assert (conf["sasl.mechanism"], conf["sasl.username"], conf["sasl.password"]) == (
            "SCRAM-SHA-512",
            "u",
            "p",
        )


def test_consumer_never_commits_or_stores_offsets_by_itself() -> None:
    s = Settings(group_id="g", group_instance_id="i-1", session_timeout_ms=7000)
    conf = consumer_config(s)
    assert conf["enable.auto.commit"] is False and conf["enable.auto.offset.store"] is False
    assert (conf["group.id"], conf["group.instance.id"], conf["session.timeout.ms"]) == ("g", "i-1", 7000)
    assert "group.instance.id" not in consumer_config(Settings())
    assert producer_config(s)["enable.idempotence"] is True


@pytest.mark.integration
def test_ensure_topics_creates_missing_topics_once(settings: Settings) -> None:
    names = [settings.input_topic, settings.dlq_topic]
    assert sorted(ensure_topics(settings, names, partitions=3)) == sorted(names)
    assert ensure_topics(settings, names, partitions=5) == []
    assert partition_count(settings, settings.input_topic) == 3
    make_admin(settings).delete_topics(names)
