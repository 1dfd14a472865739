"""The ingest loop against the real Kafka and Redis: dead letters, odd segment names, backpressure,
crashes (SIGKILL) and rebalances. Each test checks exact counts in Redis, not just "no error"."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from ingest_helpers import (
    Background,
    caught_up,
    consume_all,
    event_doc,
    high_watermarks,
    ingest_all,
    produce_docs,
    produce_raw,
    stored_event_ids,
    total_stats,
)

from worker.config import Settings
from worker.state.buffer import Buffer
from worker.stream.decode import Rejection, decode
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics
from worker.stream.trigger import DueSegment, Trigger

ROOT = Path(__file__).resolve().parent.parent


def _bad_messages(n: int) -> list[tuple[str, bytes | None, bytes | None]]:
    """(expected reason, key, value) of n bad messages, cycling through every kind of bad input."""
    now = datetime.now(UTC)
    kinds = [
        ("undecodable", lambda i: b"\xff\xfe\x00bad" + bytes([i % 256])),
        ("invalid_json", lambda i: b'{"event_id": "x' + str(i).encode()),
        ("schema", lambda i: orjson.dumps({"schema_version": 1, "event_id": f"bad-{i}", "clicked": 2})),
        ("schema", lambda i: orjson.dumps([1, 2, i])),
        (
            "unknown_schema_version",
            lambda i: orjson.dumps(event_doc(i, "s", schema_version=2, event_id=f"v2-{i}")),
        ),
        ("oversize", lambda i: orjson.dumps(event_doc(i, "s", event_id=f"big-{i}", item_text="x" * 5000))),
        (
            "too_old",
            lambda i: orjson.dumps(event_doc(i, "s", event_id=f"old-{i}", ts="2001-01-01T00:00:00Z")),
        ),
        (
            "too_new",
            lambda i: orjson.dumps(
                event_doc(i, "s", event_id=f"new-{i}", ts=(now + timedelta(days=9)).isoformat())
            ),
        ),
        ("empty", lambda i: None),
    ]
    out = []
    for i in range(n):
        reason, make = kinds[i % len(kinds)]
        out.append((reason, f"k{i}".encode() if i % 3 else None, make(i)))
    return out


def test_decode_reports_the_unknown_schema_version_before_validation(settings: Settings) -> None:
    doc = event_doc(1, "s", schema_version=7, clicked=9)
    result = decode(orjson.dumps(doc), settings, time.time())
    assert isinstance(result, Rejection) and result.code == "unknown_schema_version" and "7" in result.message


@pytest.mark.integration
def test_thousand_bad_messages_go_to_the_dlq_and_no_valid_event_is_lost(settings: Settings) -> None:
    s = settings.model_copy(update={"max_message_bytes": 4096})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=2)
    bad = _bad_messages(1000)
    valid = [event_doc(i, f"seg-{i % 5}") for i in range(500)]
    messages: list[tuple[bytes | None, bytes | None]] = []
    headers: list[list[tuple[str, bytes]] | None] = []
    for i, (_, key, value) in enumerate(bad):
        messages.append((key, value))
        headers.append([("test.bad", str(i).encode())])
        if i % 2 == 0:
            doc = valid[i // 2]
            messages.append((doc["segment"].encode(), orjson.dumps(doc)))
            headers.append(None)
    produce_raw(s, messages, headers=headers)
    ingestor = ingest_all(s)
    buffer = ingestor.buffer
    stats = total_stats(buffer, 2)
    assert stats["events"] == 500 and stats.get("duplicates", 0) == 0
    assert stats["dlq"] == 1000
    want = Counter(r for r, _, _ in bad)
    assert {k[4:]: v for k, v in stats.items() if k.startswith("dlq.")} == dict(want)
    assert sorted(stored_event_ids(buffer, 2)) == sorted(d["event_id"] for d in valid)

    dead = consume_all(s, s.dlq_topic, 1000)
    assert len(dead) == 1000
    seen_offsets = set()
    for msg in dead:
        got = dict(msg.headers())
        reason, key, value = bad[int(got["test.bad"])]
        assert got["dlq.reason"].decode() == reason
        assert got["dlq.message"]
        assert (msg.key(), msg.value()) == (key, value)
        assert got["dlq.source.topic"].decode() == s.input_topic
        seen_offsets.add((int(got["dlq.source.partition"]), int(got["dlq.source.offset"])))
    assert len(seen_offsets) == 1000
    buffer.purge()


@pytest.mark.integration
def test_odd_segment_names_are_stored_and_read_back_intact(settings: Settings) -> None:
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=3)
    names = ["../x", "a:b*", "x" * 10_240, "emoji 🚀✓ é", "two  spaces ", "{tag}", "*", "seg:{0}:offsets"]
    docs = [event_doc(i, name) for i, name in enumerate(names * 3)]
    produce_docs(settings, docs)
    buffer = ingest_all(settings).buffer
    found = {p: buffer.segments(p) for p in range(3)}
    assert sorted(n for names_ in found.values() for n in names_) == sorted(names)
    for p, segs in found.items():
        for name in segs:
            assert buffer.counts(p, name).events == 3
            snap = buffer.training_snapshot(p, name)
            assert {e.segment for e in snap.new_events} == {name}
    assert all(
        k.startswith(settings.redis_prefix.encode() + b":")
        for k in buffer.redis.scan_iter(match="*" + settings.redis_prefix + "*")
    )
    buffer.purge()


@pytest.mark.integration
def test_full_training_queue_pauses_and_resumes(settings: Settings) -> None:
    s = settings.model_copy(
        update={
            "min_new_events": 4,
            "min_positives": 1,
            "min_negatives": 1,
            "train_cooldown_s": 0,
            "consume_batch": 10,
            "consume_timeout_s": 0.02,
        }
    )
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=2)
    produce_docs(s, [event_doc(i, f"seg-{i % 4}", clicked=(i // 4) % 2) for i in range(400)])
    jobs: queue.Queue[DueSegment] = queue.Queue(1)
    buffer = Buffer(s)
    ingestor = Ingestor(s, buffer=buffer, trigger=Trigger(s, jobs, buffer))
    ingestor.subscribe()
    deadline = time.monotonic() + 30
    while not ingestor.paused:
        assert time.monotonic() < deadline
        ingestor.poll_once()
    consumed_at_pause = ingestor.stats.consumed
    for _ in range(10):
        ingestor.poll_once()
    assert ingestor.stats.consumed <= consumed_at_pause + s.consume_batch * 2
    trained = []
    while not caught_up(s, ingestor.buffer) or not jobs.empty():
        assert time.monotonic() < deadline
        try:
            job = jobs.get_nowait()
        except queue.Empty:
            ingestor.poll_once()
            continue
        assert ingestor.trigger is not None and ingestor.trigger.still_owned(job)
        snap = ingestor.buffer.training_snapshot(job.partition, job.segment)
        ingestor.buffer.mark_trained(job.partition, job.segment, snap.seq_to)
        ingestor.trigger.done(job)
        trained.append(job.segment)
        ingestor.poll_once()
    ingestor.close()
    assert set(trained) == {f"seg-{i}" for i in range(4)}
    assert total_stats(ingestor.buffer, 2)["events"] == 400
    ingestor.buffer.purge()


@pytest.mark.integration
def test_sigkilled_worker_restarted_ten_times_counts_every_event_once(settings: Settings) -> None:
    """Produces while a `python -m worker ingest` subprocess is SIGKILLed at random points and restarted."""
    n, partitions = 3000, 3
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=partitions)
    env = {
        **os.environ,
        "WORKER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "WORKER_REDIS_URL": settings.redis_url,
        "WORKER_INPUT_TOPIC": settings.input_topic,
        "WORKER_DLQ_TOPIC": settings.dlq_topic,
        "WORKER_GROUP_ID": settings.group_id,
        "WORKER_REDIS_PREFIX": settings.redis_prefix,
        "WORKER_GROUP_INSTANCE_ID": f"kill-{settings.group_id}",
        "WORKER_SESSION_TIMEOUT_MS": "6000",
        "WORKER_CONSUME_BATCH": "25",
        "WORKER_LOG_LEVEL": "WARNING",
    }
    docs = [event_doc(i, f"seg-{i % 17}") for i in range(n)]
    stop_producing = threading.Event()

    def producer() -> None:
        for start in range(0, n, 150):
            produce_docs(settings, docs[start : start + 150])
            if stop_producing.wait(0.4):
                return

    feeder = threading.Thread(target=producer, daemon=True)
    feeder.start()
    buffer = Buffer(settings)
    rng = random.Random(42)
    mid_stream = 0
    cmd = [sys.executable, "-m", "worker", "ingest", "--no-create-topics"]
    for _ in range(10):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 2.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        stored = sum(v or 0 for v in buffer.stored_offsets(range(partitions)).values())
        mid_stream += 0 < stored < n
    feeder.join(60)
    assert not feeder.is_alive()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    marks = high_watermarks(settings)
    while not caught_up(settings, buffer, marks):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert mid_stream >= 3, "the kills should land while events are still arriving"
    stats = total_stats(buffer, partitions)
    assert stats["events"] == n
    assert stats.get("duplicates", 0) == 0
    ids = stored_event_ids(buffer, partitions)
    assert len(ids) == n and set(ids) == {d["event_id"] for d in docs}
    assert sum(buffer.counts(p, s).events for p in range(partitions) for s in buffer.segments(p)) == n
    buffer.purge()


@pytest.mark.integration
def test_two_consumers_split_the_segments_and_a_rebalance_loses_and_doubles_nothing(
    settings: Settings,
) -> None:
    n, partitions = 4000, 4
    s = settings.model_copy(update={"consume_batch": 50, "session_timeout_ms": 10_000})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=partitions)
    docs = [event_doc(i, f"seg-{i % 40}") for i in range(n)]
    writers: dict[str, set[tuple[int, str]]] = {"a": set(), "b": set()}

    def recorder(name: str):  # type: ignore[no-untyped-def]
        return lambda result: writers[name].update((st.partition, st.segment) for st in result.segments)

    a = Background(Ingestor(s, on_write=recorder("a")))
    b = Background(Ingestor(s, on_write=recorder("b")))
    produce_docs(s, docs[:1000])
    a.start()
    deadline = time.monotonic() + 60
    while len(a.ingestor.owned_partitions()) < partitions:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    b.start()
    produce_docs(s, docs[1000:2000])
    while not (a.ingestor.owned_partitions() and b.ingestor.owned_partitions()):
        assert time.monotonic() < deadline and a.error is None and b.error is None
        time.sleep(0.1)
    owned_a, owned_b = a.ingestor.owned_partitions(), b.ingestor.owned_partitions()
    assert owned_a.isdisjoint(owned_b) and owned_a | owned_b == set(range(partitions))
    produce_docs(s, docs[2000:3000])
    while not caught_up(s, a.ingestor.buffer):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert writers["a"] and writers["b"]
    b_only = {seg for p, seg in writers["b"]}
    assert all(p in owned_b for p, _ in writers["b"])
    b.stop.set()
    b.join(30)
    produce_docs(s, docs[3000:])
    while not caught_up(s, a.ingestor.buffer):
        assert time.monotonic() < deadline and a.error is None
        time.sleep(0.1)
    a.stop.set()
    a.join(30)
    assert a.error is None and b.error is None
    buffer = a.ingestor.buffer
    stats = total_stats(buffer, partitions)
    assert stats["events"] == n and stats.get("duplicates", 0) == 0 and stats.get("stale", 0) == 0
    ids = stored_event_ids(buffer, partitions)
    assert len(ids) == n and set(ids) == {d["event_id"] for d in docs}
    assert b_only, "the second consumer stored segments of its own"
    buffer.purge()


_WIDE = Settings(max_event_age_s=4e9, max_clock_skew_s=4e9)


def _agree(raw: bytes, now: float) -> bool:
    """The fast path accepts only what `decode` accepts, with the same fields. True if it accepted."""
    from worker.state.entry import pair_key
    from worker.stream.decode import fast_decode

    fast = fast_decode(raw, now - _WIDE.max_event_age_s, now + _WIDE.max_clock_skew_s)
    slow = decode(raw, _WIDE, now)
    if fast is None or len(raw) > _WIDE.max_message_bytes:  # ingest checks the size first
        return False
    assert not isinstance(slow, Rejection), (raw, slow)
    assert fast == (slow.segment, slow.event_id, slow.clicked, pair_key(slow.query, slow.item_id)), raw
    return True


def test_fast_path_agrees_with_pydantic_on_valid_and_odd_events() -> None:
    from worker.stream.decode import fast_decode

    now = time.time()
    base = event_doc(1, "seg")
    docs: list[object] = [
        base,
        {**base, "query": None},
        {**base, "query": ""},
        {k: v for k, v in base.items() if k not in ("query", "schema_version")},
        *({**base, "ts": ts} for ts in _ODD_TIMES),
        {**base, "clicked": True},
        {**base, "clicked": 1.0},
        {**base, "clicked": 2},
        {**base, "clicked": -0},
        {**base, "schema_version": 2},
        {**base, "schema_version": True},
        {**base, "schema_version": 1.0},
        {**base, "extra": 1},
        {**base, "segment": "a\nb"},
        {**base, "segment": "a\x7fb"},
        {**base, "segment": "a\u2028b"},
        {**base, "segment": ""},
        {**base, "segment": " "},
        {**base, "segment": "é" * 16_384},
        {**base, "segment": "é" * 16_385},
        {**base, "segment": "😀" * 16_384},
        {**base, "event_id": 5},
        {**base, "item_id": "i" * 257},
        {**base, "item_text": ""},
        {**base, "query": "q" * 2_049},
        [base],
        None,
    ]
    accepted = sum(_agree(orjson.dumps(doc), now) for doc in docs)
    raw_variants = [
        b'{"event_id": "x',
        orjson.dumps(base)[:-1] + b', "event_id": "dup"}',
        orjson.dumps(base)[:-1] + b', "clicked": 1, "clicked": 0}',
        orjson.dumps(base).replace(b'"seg"', b'"s\\ud800"'),
        orjson.dumps(base).replace(b'"seg"', b'"s\xff"'),
        b" \n" + orjson.dumps(base, option=orjson.OPT_INDENT_2) + b"\n",
        orjson.dumps(base) + b"x",
    ]
    accepted += sum(_agree(raw, now) for raw in raw_variants)
    assert _agree(orjson.dumps(base), now)
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        assert fast_decode(orjson.dumps({**base, "ts": edge}), -1e13, 1e13) is None
    assert accepted >= 8, "the fast path must take the plain events, not send everything to pydantic"


_ODD_TIMES = [
    "2026-01-02T03:04:05",
    "2026-01-02T03:04:05Z",
    "2026-01-02t03:04:05z",
    "2026-01-02T03:04:05.5+02:00",
    "2026-01-02T03:04:05.123456789Z",
    "2026-01-02T03:04:05,5Z",
    "2026-01-02 03:04:05Z",
    "2026-01-02T03:04Z",
    "2026-01-02T23:59:60Z",
    "2026-01-02T03:04:05+24:00",
    "2026-01-02T03:04:05-00:00",
    "2026-01-02T03:04:05+0200",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "2026-01-02",
    "2026-13-02T03:04:05Z",
    1767000000,
    "1767000000",
]


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    doc=st.fixed_dictionaries(
        {
            "event_id": st.one_of(st.text(max_size=300), st.integers(-(2**63), 2**63 - 1)),
            "ts": st.one_of(
                st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat), st.text(max_size=40)
            ),
            "segment": st.text(max_size=40),
            "item_id": st.text(max_size=20),
            "item_text": st.text(max_size=20),
            "clicked": st.one_of(st.integers(-1, 2), st.booleans(), st.floats(0, 1)),
        },
        optional={
            "query": st.one_of(st.none(), st.text(max_size=20)),
            "schema_version": st.one_of(st.integers(0, 2), st.booleans(), st.floats(0, 2)),
            "extra": st.integers(0, 9),
        },
    )
)
def test_fast_path_never_accepts_what_pydantic_rejects(doc: dict[str, object]) -> None:
    _agree(orjson.dumps(doc), time.time())
