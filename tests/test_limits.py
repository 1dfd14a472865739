"""Limits against the real Kafka and Redis (issue #38): a message near the broker's limit, a batch with
more distinct pairs than the candidate cap, a Redis out of memory. Each fails on the code before it:
the dead letter did not fit and stopped the loop, the cap was exceeded, the loop spun on OOM."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from ingest_helpers import (
    Background,
    caught_up,
    consume_all,
    event_doc,
    produce_docs,
    produce_raw,
    stored_event_ids,
)
from test_buffer import pending

from worker.config import Settings
from worker.state.buffer import Buffer, PartitionWrite
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics
from worker.tools.procs import free_port

pytestmark = pytest.mark.integration


def test_a_message_near_the_broker_limit_is_dead_lettered_bounded_and_ingest_goes_on(
    settings: Settings,
) -> None:
    """A value and key as large as the topic takes: its dead letter's value is cut so that the record
    fits with its headers, the original size in a header, and the events after it are buffered."""
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=1)
    big = b"x" * 1_044_500  # with its 4 kB key, 40 bytes under what this broker and producer take
    produce_raw(settings, [(b"k" * 4000, big)])
    docs = [event_doc(i, "a") for i in range(20)]
    produce_docs(settings, docs)
    ingestor = Ingestor(settings)
    bg = Background(ingestor)
    bg.start()
    try:
        deadline = time.monotonic() + 60
        while not caught_up(settings, ingestor.buffer):
            assert time.monotonic() < deadline and bg.error is None, bg.error
            time.sleep(0.1)
    finally:
        bg.stop.set()
        bg.join(30)
    assert bg.error is None
    assert sorted(stored_event_ids(ingestor.buffer, 1)) == sorted(d["event_id"] for d in docs)
    (dead,) = consume_all(settings, settings.dlq_topic, 1)
    headers = {k: v for k, v in dead.headers()}
    assert headers["dlq.reason"] == b"oversize"
    assert headers["dlq.truncated.value"] == str(len(big)).encode()
    assert 1_000_000 < len(dead.value()) < len(big) and big.startswith(dead.value())
    assert dead.key() == b"k" * 4000
    ingestor.buffer.purge()


def test_one_batch_with_more_distinct_pairs_than_the_cap_keeps_the_cap(settings: Settings) -> None:
    """Pairs are added in chunks of 2,000 inside the script; the count must cover every chunk."""
    buffer = Buffer(settings.model_copy(update={"candidates_cap": 10, "sample_cap": 16, "new_events_cap": 8}))
    try:
        events = []
        for i in range(2500):
            e = pending(i)
            doc = orjson.loads(e.payload)
            doc["item_id"] = f"item-{i}"
            events.append(e._replace(pair=f"q\x00item-{i}".encode(), payload=orjson.dumps(doc)))
        buffer.write([PartitionWrite(buffer.topic, 0, 2500, events)])
        c = buffer.counts(0, "s")
        assert c.candidates == 10
        assert len(buffer.candidates(0, "s")) == 10
    finally:
        buffer.purge()


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[str]:
    """A private Redis with 3 MB of memory and `noeviction`, as production Redis often runs."""
    port = free_port()
    server = shutil.which("redis-server")
    assert server is not None
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--maxmemory",
            "3mb",
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_out_of_memory_backs_off_is_reported_and_loses_nothing(
    settings: Settings, small_redis: str
) -> None:
    s = settings.model_copy(update={"redis_url": small_redis, "consume_batch": 200})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=1)
    docs = [event_doc(i, f"seg-{i % 3}", item_text="t" * 2000) for i in range(3000)]
    produce_docs(s, docs)
    ingestor = Ingestor(s)
    bg = Background(ingestor)
    bg.start()
    try:
        deadline = time.monotonic() + 60
        while ingestor.stats.redis_oom == 0:
            assert time.monotonic() < deadline and bg.error is None, bg.error
            time.sleep(0.1)
        assert not ingestor.redis_writable()
        time.sleep(8)
        # A tight loop would have retried hundreds of times in 8 s; the back-off doubles from 0.5 s.
        assert 1 <= ingestor.stats.redis_oom <= 6, ingestor.stats.redis_oom
        assert not ingestor.redis_writable()
        redis.Redis.from_url(small_redis).config_set("maxmemory", 0)
        while not caught_up(s, ingestor.buffer):
            assert time.monotonic() < deadline + 60 and bg.error is None, bg.error
            time.sleep(0.1)
        assert ingestor.redis_writable()
    finally:
        bg.stop.set()
        bg.join(60)
    assert bg.error is None
    ids = stored_event_ids(ingestor.buffer, 1)
    assert len(ids) == len(set(ids)) == len(docs)
