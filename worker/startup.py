"""The start-up checks of `python -m worker run`: each dependency the worker cannot run without (Redis,
Kafka, the model store) is tried once before anything is consumed, and a failure names the setting to
look at instead of surfacing as an error on the first event."""

from __future__ import annotations

import time
from typing import Any

import redis
from confluent_kafka import KafkaError, KafkaException

from worker.config import Settings
from worker.state.client import RedisClient


class StartupError(RuntimeError):
    """A dependency (Kafka, Redis, the model store) is unusable; the message says which and why."""


def check_dependencies(settings: Settings, client: RedisClient) -> None:
    """Fail at start-up, with the setting to look at, rather than on the first event."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise StartupError(f"Redis refused the credentials in WORKER_REDIS_URL: {exc}") from None
    except redis.RedisError as exc:
        raise StartupError(f"Redis at WORKER_REDIS_URL is not reachable: {exc}") from None
    check_kafka(settings)
    try:
        settings.model_store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"WORKER_MODEL_STORE={settings.model_store} is not usable: {exc}") from None


def check_kafka(settings: Settings, timeout_s: float = 15.0) -> None:
    """A metadata request, failing at once on refused credentials instead of waiting out the timeout."""
    from confluent_kafka.admin import AdminClient

    from worker.stream.kafka import client_config

    refused: list[str] = []

    def on_error(err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION:
            refused.append(err.str())

    conf: dict[str, Any] = {**client_config(settings), "error_cb": on_error}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return
        except KafkaException as exc:
            last = exc
        admin.poll(0)
        if refused:
            raise StartupError(
                "Kafka refused the credentials of WORKER_KAFKA_SASL_USERNAME / WORKER_KAFKA_SASL_PASSWORD "
                f"({settings.kafka_sasl_mechanism}): {refused[0]}"
            )
    raise StartupError(
        f"Kafka at WORKER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} did not answer within "
        f"{timeout_s:.0f} s: {last}"
    )
