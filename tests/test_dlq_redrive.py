"""`python -m worker dlq list|redrive` against the real Kafka and Redis, with dead letters made by the real
ingest path; and the header handling of re-drive (strip `dlq.*`, count plus one, the cap) without them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from confluent_kafka import Message, TopicPartition
from ingest_helpers import event_doc, high_watermarks, ingest_all, produce_raw, stored_event_ids, total_stats

from worker import cli
from worker.config import ConfigError, Settings, load_settings
from worker.state.buffer import Buffer
from worker.state.keys import dlq_redrive_lock_key
from worker.state.lock import Lock
from worker.stream.dlq import REDRIVE_COUNT, dead_letter, read_dead_letter, redrive_headers
from worker.stream.kafka import ensure_topics, make_consumer, max_record_bytes
from worker.tools.dlq import preview
from worker.tools.dlq_read import reader
from worker.tools.redrive import skip_reason
from worker.tools.run_settings import settings_env

PARTITIONS = 2
Headers = list[tuple[str, bytes]]


# Header handling (no stack)


def _original(headers: Headers, topic: str = "clicks", value: bytes = b"{bad") -> Message:
    return Message(topic=topic, partition=1, offset=41, key=b"seg", value=value, headers=headers)


def _as_dlq_record(msg: Message, reason: str = "invalid_json", max_bytes: int = 1_048_576) -> Message:
    """What the DLQ holds for `msg`: the `dead_letter` record, read back as a message of the DLQ topic."""
    record = dead_letter(msg, reason, "not JSON", max_bytes)
    return Message(
        topic="clicks-dlq",
        partition=0,
        offset=7,
        key=record.key,
        value=record.value,
        headers=record.headers,
        timestamp=(1, 1_700_000_000_000),
    )


def test_redrive_strips_dlq_headers_keeps_the_rest_and_counts_one_more() -> None:
    rec = read_dead_letter(_as_dlq_record(_original([("trace", b"t1"), (REDRIVE_COUNT, b"1")])))
    assert (rec.reason, rec.source_topic, rec.source_partition, rec.source_offset) == (
        "invalid_json",
        "clicks",
        1,
        41,
    )
    assert rec.original_headers == [("trace", b"t1")]
    assert rec.redrive_count == 1 and rec.truncated == ()
    assert redrive_headers(rec) == [("trace", b"t1"), (REDRIVE_COUNT, b"2")]
    fresh = read_dead_letter(_as_dlq_record(_original([("trace", b"t1")])))
    assert fresh.redrive_count == 0
    assert redrive_headers(fresh) == [("trace", b"t1"), (REDRIVE_COUNT, b"1")]


def test_dlq_headers_a_producer_sent_never_shadow_the_workers() -> None:
    forged: Headers = [("dlq.reason", b"fake"), ("dlq.source.topic", b"elsewhere"), ("keep", b"k")]
    rec = read_dead_letter(_as_dlq_record(_original(forged)))
    assert (rec.reason, rec.source_topic) == ("invalid_json", "clicks")
    assert rec.original_headers == [("keep", b"k")]


def test_the_count_survives_when_the_original_headers_are_dropped() -> None:
    huge: Headers = [("blob", b"x" * 400_000), (REDRIVE_COUNT, b"2")]
    rec = read_dead_letter(_as_dlq_record(_original(huge)))
    assert rec.truncated == ("dlq.headers.dropped",)
    assert rec.redrive_count == 2


def test_skip_reasons_cap_truncation_bad_count_and_source() -> None:
    targets = {"clicks"}

    def why(headers: Headers, **kw: Any) -> str | None:
        return skip_reason(read_dead_letter(_as_dlq_record(_original(headers, **kw))), 3, targets)

    assert why([(REDRIVE_COUNT, b"2")]) is None
    assert why([(REDRIVE_COUNT, b"3")]) == "cap"
    assert why([(REDRIVE_COUNT, b"-1")]) == "bad_count"
    assert why([(REDRIVE_COUNT, b"many")]) == "bad_count"
    assert why([], topic="other-topic") == "foreign_source"
    cut = _as_dlq_record(_original([], value=b"v" * 5000), max_bytes=4096)
    assert skip_reason(read_dead_letter(cut), 3, targets) == "truncated"
    no_source = Message(topic="clicks-dlq", partition=0, offset=1, value=b"x", headers=[("dlq.reason", b"x")])
    assert skip_reason(read_dead_letter(no_source), 3, targets) == "no_source"


def test_preview_escapes_control_characters() -> None:
    assert preview(b"\x1b[31mred\n" + b"x" * 200) == "\\x1b[31mred\\n" + "x" * 71 + "..."
    assert preview(None) == "(no value)"


@pytest.mark.parametrize("argv", [["dlq", "--help"], ["dlq", "list", "--help"], ["dlq", "redrive", "--help"]])
def test_every_help_works(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    assert "usage: python -m worker dlq" in capsys.readouterr().out


def test_bad_since_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dlq", "redrive", "--since", "yesterday"])
    assert exit_.value.code == 2
    assert "not an ISO datetime" in capsys.readouterr().err


def test_the_cap_is_validated(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORKER_DLQ_REDRIVE_MAX", "0")
    with pytest.raises(ConfigError, match="WORKER_DLQ_REDRIVE_MAX"):
        load_settings()


# Against the real stack


@pytest.fixture
def dlq_cli(
    settings: Settings, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Any]:
    """Runs `python -m worker dlq ...` in-process under `settings` (plus overrides); returns (rc, JSON),
    and keeps the last stderr in `.errors[0]`."""
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=PARTITIONS)

    def run(*argv: str, **overrides: object) -> tuple[int, Any]:
        for name, value in settings_env(settings, **overrides).items():
            clean_env.setenv(name, value)
        capsys.readouterr()
        rc = cli.main(["dlq", *argv, "--json"])
        out, errors[0] = capsys.readouterr()
        return rc, orjson.loads(out) if out else None

    errors: list[str] = [""]
    run.errors = errors  # type: ignore[attr-defined]
    yield run
    Buffer(settings).purge()


def _bad_json(i: int) -> tuple[bytes, bytes, Headers]:
    return f"seg-{i}".encode(), b'{"event_id": "b-%d", ' % i, [("trace", f"t-{i}".encode())]


def _bad_schema(i: int) -> tuple[bytes, bytes, Headers]:
    return f"seg-{i}".encode(), orjson.dumps({"schema_version": 1, "segment": f"seg-{i}"}), []


def _produce(settings: Settings, msgs: list[tuple[bytes, bytes, Headers]]) -> None:
    produce_raw(settings, [(k, v) for k, v, _ in msgs], headers=[h or None for _, _, h in msgs])


def _read_from(settings: Settings, topic: str, starts: dict[int, int]) -> list[Message]:
    """The messages of `topic` from `starts` up to its high watermark now."""
    ends = high_watermarks(settings, topic)
    want = sum(ends[p] - starts.get(p, 0) for p in ends)
    consumer = reader(settings)
    out: list[Message] = []
    try:
        consumer.assign([TopicPartition(topic, p, starts.get(p, 0)) for p in ends])
        deadline = time.monotonic() + 30
        while len(out) < want and time.monotonic() < deadline:
            out += [m for m in consumer.consume(100, 0.5) if m.error() is None]
    finally:
        consumer.close()
    assert len(out) == want
    return out


@pytest.mark.integration
def test_list_counts_per_reason_and_commits_nothing(
    settings: Settings, dlq_cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _produce(settings, [_bad_json(i) for i in range(3)] + [_bad_schema(i) for i in range(2)])
    produce_raw(settings, [(b"seg-ok", orjson.dumps(event_doc(1, "seg-ok")))])
    ingest_all(settings)
    dlq_before = high_watermarks(settings, settings.dlq_topic)

    rc, doc = dlq_cli("list", "--limit", "2")
    assert rc == 0
    assert doc["counts"] == {"invalid_json": 3, "schema": 2} and doc["total"] == 5
    assert len(doc["messages"]) == 2
    sources = {(m["source_partition"], m["source_offset"]) for m in doc["messages"]}
    assert len(sources) == 2
    for m in doc["messages"]:
        assert m["source_topic"] == settings.input_topic and m["redrive_count"] == 0
        assert m["preview"]
    rc, doc = dlq_cli("list", "--reason", "schema")
    assert doc["counts"] == {"schema": 2} and len(doc["messages"]) == 2
    assert cli.main(["dlq", "list", "--limit", "1"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[:3] == ["5 dead letters", f"  {'invalid_json':<24} 3", f"  {'schema':<24} 2"]
    assert len(text) == 4 and f"from {settings.input_topic}/" in text[3]

    probe = make_consumer(settings)
    try:
        committed = probe.committed([TopicPartition(settings.dlq_topic, p) for p in range(PARTITIONS)], 10)
    finally:
        probe.close()
    assert all(tp.offset < 0 for tp in committed)
    assert high_watermarks(settings, settings.dlq_topic) == dlq_before


@pytest.mark.integration
def test_redrive_sends_each_once_and_a_still_bad_message_returns_with_its_count(
    settings: Settings, dlq_cli: Any
) -> None:
    bad = [_bad_json(i) for i in range(2)] + [_bad_schema(9)]
    _produce(settings, bad)
    ingest_all(settings)
    input_before = high_watermarks(settings)

    rc, doc = dlq_cli("redrive")
    assert rc == 0 and doc["sent"] == {"invalid_json": 2, "schema": 1} and doc["skipped"] == {}
    redriven = _read_from(settings, settings.input_topic, input_before)
    assert sorted((m.key(), m.value(), m.headers()) for m in redriven) == sorted(
        (k, v, [*h, (REDRIVE_COUNT, b"1")]) for k, v, h in bad
    )
    everything = _read_from(settings, settings.input_topic, {})
    came_from = {m.value(): m.partition() for m in everything if m.offset() < input_before[m.partition()]}
    assert all(came_from[m.value()] == m.partition() for m in redriven)

    input_after = high_watermarks(settings)
    rc, doc = dlq_cli("redrive")
    assert rc == 0 and doc["sent"] == {} and doc["skipped"] == {}
    assert high_watermarks(settings) == input_after

    ingest_all(settings)  # the re-driven messages fail again and return to the DLQ with their count
    rc, doc = dlq_cli("list", "--limit", "100")
    assert doc["counts"] == {"invalid_json": 4, "schema": 2}
    back = [m for m in doc["messages"] if m["redrive_count"] == 1]
    assert sorted((m["source_partition"], m["source_offset"]) for m in back) == sorted(
        (m.partition(), m.offset()) for m in redriven
    )

    rc, doc = dlq_cli("redrive")  # only the new dead letters, as count 2
    assert doc["sent"] == {"invalid_json": 2, "schema": 1}
    twice = _read_from(settings, settings.input_topic, input_after)
    assert sorted(dict(m.headers())[REDRIVE_COUNT] for m in twice) == [b"2"] * 3

    ingest_all(settings)
    input_capped = high_watermarks(settings)
    rc, doc = dlq_cli("redrive", dlq_redrive_max=2)  # re-driven twice: the cap stops a third time
    assert rc == 0 and doc["sent"] == {}
    assert doc["skipped"] == {"invalid_json": {"cap": 2}, "schema": {"cap": 1}}
    assert high_watermarks(settings) == input_capped
    rc, doc = dlq_cli("redrive")
    assert doc["sent"] == {} and doc["skipped"] == {}

    held = Lock(Buffer(settings).redis, dlq_redrive_lock_key(settings.redis_prefix, settings.dlq_topic), 30)
    assert held.acquire()
    try:
        rc, doc = dlq_cli("redrive")
        assert rc == 1 and doc is None
        assert "another re-drive" in dlq_cli.errors[0]
    finally:
        held.release()


@pytest.mark.integration
def test_fixable_dead_letters_land_in_the_buffers_once(settings: Settings, dlq_cli: Any) -> None:
    old_ts = (datetime.now(UTC) - timedelta(days=2)).isoformat()
    stale = [event_doc(i, "seg-late", ts=old_ts) for i in range(3)]
    produce_raw(settings, [(d["segment"].encode(), orjson.dumps(d)) for d in stale])
    ingest_all(settings.model_copy(update={"max_event_age_s": 86_400.0}))
    buffer = Buffer(settings)
    assert total_stats(buffer, PARTITIONS).get("events", 0) == 0

    # Dead letters written straight to the DLQ in the worker's format: a valid original (a score request
    # that failed for a reason since fixed, say), one cut to fit, and one from a topic the worker reads not.
    valid = event_doc(100, "seg-direct")
    cap = max_record_bytes(settings)
    made = [
        dead_letter(_input_msg(settings, valid), "scoring_failed", "model missing", cap),
        dead_letter(
            _input_msg(settings, event_doc(101, "seg-cut", item_text="x" * 900)), "oversize", "", 2000
        ),
        dead_letter(_input_msg(settings, event_doc(102, "seg-x"), topic="elsewhere"), "schema", "", cap),
    ]
    assert made[1].value is not None and len(made[1].value) < 900
    produce_raw(
        settings,
        [(r.key, r.value) for r in made],
        topic=settings.dlq_topic,
        headers=[[(k, v if isinstance(v, bytes) else b"") for k, v in r.headers] for r in made],
    )
    input_before = high_watermarks(settings)

    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    rc, doc = dlq_cli("redrive", "--since", future)
    assert rc == 0 and doc["sent"] == {}
    rc, doc = dlq_cli("redrive", "--reason", "too_old", "--dry-run")
    assert doc["dry_run"] and doc["sent"] == {"too_old": 3}
    assert high_watermarks(settings) == input_before

    rc, doc = dlq_cli("redrive", "--reason", "too_old")
    assert doc["sent"] == {"too_old": 3}
    rc, doc = dlq_cli("redrive")
    assert doc["sent"] == {"scoring_failed": 1}
    assert doc["skipped"] == {"oversize": {"truncated": 1}, "schema": {"foreign_source": 1}}
    rc, doc = dlq_cli("redrive")
    assert doc["sent"] == {} and doc["skipped"] == {} and doc["already_redriven"] == 0
    assert sum(high_watermarks(settings).values()) == sum(input_before.values()) + 4

    ingest_all(settings)
    assert total_stats(buffer, PARTITIONS)["events"] == 4
    assert sorted(stored_event_ids(buffer, PARTITIONS)) == sorted(
        [d["event_id"] for d in stale] + [valid["event_id"]]
    )
    rc, doc = dlq_cli("list")
    assert doc["counts"] == {"too_old": 3, "scoring_failed": 1, "oversize": 1, "schema": 1}


def _input_msg(settings: Settings, doc: dict[str, Any], topic: str | None = None) -> Message:
    return Message(
        topic=topic or settings.input_topic,
        partition=0,
        offset=1000,
        key=doc["segment"].encode(),
        value=orjson.dumps(doc),
        headers=[],
    )
