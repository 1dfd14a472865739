"""Shared fixtures. Integration tests use the real local stack (`python -m worker stack up`, started by
`make test`), or whatever `WORKER_KAFKA_BOOTSTRAP` / `WORKER_REDIS_URL` point at."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from worker_helpers import WorkerProc

from worker.config import Settings, load_settings
from worker.tools.run_settings import isolated


def _stack_settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def stack() -> Settings:
    """Fails (does not skip) when the stack is down: integration tests are part of `make test`."""
    from confluent_kafka.admin import AdminClient

    settings = _stack_settings()
    try:
        redis.Redis.from_url(settings.redis_url, socket_timeout=5).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis at {settings.redis_url} is not reachable ({exc}); run `python -m worker stack up`"
        )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        admin.list_topics(timeout=15)
    except Exception as exc:
        pytest.fail(
            f"Kafka at {settings.kafka_bootstrap} is not reachable ({exc}); run `python -m worker stack up`"
        )
    return settings


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(stack: Settings, unique: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings isolated per test: own topics, consumer group, Redis key prefix and model store. The run
    id starts with `t`, so the Redis prefix never occurs inside a key's hex segment hash."""
    yield isolated(stack, f"t{unique}", model_store=tmp_path / "models")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Removes every WORKER_* variable so a test sees only what it sets."""
    for key in list(os.environ):
        if key.startswith("WORKER_"):
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def procs() -> Iterator[list[WorkerProc]]:
    """Worker processes a test starts; any still running at its end are killed."""
    started: list[WorkerProc] = []
    yield started
    for p in started:
        if p.alive():
            p.proc.kill()
            p.proc.wait()
