"""The local stack: real Kafka and Redis processes, started and stopped by `worker.tools.stack`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer

from worker.config import Settings, load_settings
from worker.tools import stack as stack_mod
from worker.tools.procs import free_port
from worker.tools.stack.kafka import kafka_cluster_id

pytestmark = pytest.mark.integration


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_produce_and_consume_through_the_real_broker(stack: Settings) -> None:
    topic = f"roundtrip-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for i in range(10):
        producer.produce(topic, key=b"seg", value=f"m{i}".encode())
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": stack.kafka_bootstrap,
            "group.id": f"g-{topic}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    got: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(got) < 10 and time.monotonic() < deadline:
        for msg in consumer.consume(10, 1.0):
            if msg.error() is None:
                got.append(msg.value())
    consumer.close()
    assert got == [f"m{i}".encode() for i in range(10)]


def test_write_and_read_through_the_real_redis(stack: Settings) -> None:
    client = redis.Redis.from_url(stack.redis_url)
    key = f"test:{uuid.uuid4().hex}"
    client.set(key, b"\x00value\xff", ex=60)
    assert client.get(key) == b"\x00value\xff"
    assert client.config_get("appendonly")["appendonly"] == "yes"


def test_status_reports_both_healthy(stack: Settings) -> None:
    report = stack_mod.status(stack)
    assert report["kafka"]["healthy"] is True
    assert report["redis"]["healthy"] is True


def test_up_then_down_leaves_no_process_behind(tmp_path: Path, stack: Settings) -> None:
    """A second stack on free ports in its own directory: `down` stops exactly what `up` started."""
    env = {
        "WORKER_CACHE_DIR": str(tmp_path),
        "WORKER_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "WORKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    (tmp_path / "kafka").symlink_to((stack.cache_dir / "kafka").resolve())
    settings = load_settings(
        cache_dir=tmp_path, kafka_bootstrap=env["WORKER_KAFKA_BOOTSTRAP"], redis_url=env["WORKER_REDIS_URL"]
    )
    full_env = {**os.environ, **env}

    def cli(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker", "stack", action],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    started = time.monotonic()
    up = cli("up")
    assert up.returncode == 0, up.stderr
    status = cli("status")
    assert status.returncode == 0 and status.stdout.count("healthy") == 2, status.stdout
    assert time.monotonic() - started < 60
    pids = stack_mod.started_pids(settings)
    assert len(pids) == 2

    down = cli("down")
    assert down.returncode == 0, down.stderr
    for pid in pids:
        assert not _running(pid), f"pid {pid} survived `stack down`"
    assert stack_mod.started_pids(settings) == []
    after = cli("status")
    assert after.returncode == 1 and after.stdout.count("DOWN") == 2
    assert stack_mod.kafka_healthy(stack.kafka_bootstrap), "the main stack must be untouched"
    assert stack_mod.redis_healthy(stack.redis_url)


def test_cluster_ids_never_look_like_an_option() -> None:
    ids = [kafka_cluster_id() for _ in range(2000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("service", ["redis", "kafka"])
def test_up_refuses_a_port_another_process_holds(tmp_path: Path, service: str) -> None:
    """Otherwise the new server fails to bind, the other one answers the probe, and `up` says started."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = load_settings(
            cache_dir=tmp_path,
            kafka_bootstrap=f"127.0.0.1:{port if service == 'kafka' else free_port()}",
            redis_url=f"redis://127.0.0.1:{port if service == 'redis' else free_port()}/0",
        )
        ep = stack_mod.Endpoints.from_settings(settings)
        start = stack_mod.start_redis if service == "redis" else stack_mod.start_kafka
        setting = "WORKER_REDIS_URL" if service == "redis" else "WORKER_KAFKA_BOOTSTRAP"
        with pytest.raises(stack_mod.StackError, match=f"127.0.0.1:{port} is already in use.*{setting}"):
            start(settings, ep)
    assert stack_mod.started_pids(settings) == []


def test_down_finds_this_stacks_redis_under_other_settings(tmp_path: Path) -> None:
    """A `down` (or `up`) with another WORKER_REDIS_URL must not orphan the Redis this directory started."""
    first = load_settings(cache_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    other = load_settings(cache_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert stack_mod.start_redis(first, stack_mod.Endpoints.from_settings(first)).startswith("started")
    pid = stack_mod.started_pids(first)[0]
    try:
        with pytest.raises(stack_mod.StackError, match="runs with other settings"):
            stack_mod.start_redis(other, stack_mod.Endpoints.from_settings(other))
        assert stack_mod.redis_healthy(first.redis_url)
        assert stack_mod.down(other)["redis"] == f"stopped (pid {pid})"
        assert not _running(pid)
    finally:
        stack_mod.down(first)


def test_kafka_consumer_groups_tool_shows_the_workers_lag_and_offsets_that_match_redis(
    settings: Settings,
) -> None:
    """`python -m worker stack kafka-tool consumer-groups --describe --group G`, as an operator runs it:
    Kafka's own tool (its jars resolved from Maven Central like the broker's) against the test broker."""
    from ingest_helpers import event_doc, ingest_all, produce_docs

    from worker.stream.kafka import ensure_topics

    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=3)
    produce_docs(settings, [event_doc(i, f"seg-{i % 9}") for i in range(300)])
    buffer = ingest_all(settings).buffer
    stored = buffer.stored_offsets(range(3))
    env = {
        **os.environ,
        "WORKER_CACHE_DIR": str(settings.cache_dir),
        "WORKER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "WORKER_REDIS_URL": settings.redis_url,
    }
    tool = ["stack", "kafka-tool", "consumer-groups", "--describe", "--group", settings.group_id]
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *tool],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(settings.group_id + " ")]
    header = next(line.split() for line in proc.stdout.splitlines() if line.startswith("GROUP"))
    table = {int(r[header.index("PARTITION")]): dict(zip(header, r, strict=False)) for r in rows}
    assert sorted(table) == [0, 1, 2], proc.stdout
    for partition, row in table.items():
        assert int(row["CURRENT-OFFSET"]) == stored[partition] == int(row["LOG-END-OFFSET"])
        assert row["LAG"] == "0"
    assert sum(stored.values()) == 300
    buffer.purge()


def test_an_unknown_kafka_tool_names_the_ones_there_are(stack: Settings) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "stack", "kafka-tool", "consumer-group"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "consumer-groups" in proc.stderr, proc.stderr
