"""Hostile input against the real Kafka broker, the real `Ingestor` and the real Redis.

A property-based test mixes thousands of malformed, oversize and hostile messages with valid click events
(duplicates with other payloads among them), produces them to a fresh topic per example, runs the ingest
loop until Redis holds offsets up to the topic's end, and checks:

- every bad message is on the dead-letter topic exactly once, with its original key, bytes and headers, a
  `dlq.reason` (the exact code for each kind of input), a `dlq.message`, and the source topic, partition and
  offset it was produced at;
- the ingestor never died (no exception out of the loop) and consumed every message;
- every valid event is counted exactly once in Redis (partition stats, segment counts, the stored sample),
  a duplicate event id is counted as a duplicate and the first payload wins.

A deterministic test sends one message of each kind and checks the exact reason code of each.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from itertools import count
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from confluent_kafka.admin import AdminClient
from hypothesis import HealthCheck, Phase, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from ingest_helpers import high_watermarks, ingest_all, total_stats

from worker.config import Settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer
from worker.state.entry import decode_entry
from worker.stream.decode import Rejection, decode
from worker.stream.kafka import ensure_topics, make_consumer, make_producer

pytestmark = pytest.mark.badinput

PARTITIONS = 2
# The limits the strategies build around: the defaults, forced onto every test's settings.
LIMITS = {
    name: Settings.model_fields[name].default
    for name in ("max_message_bytes", "max_event_age_s", "max_clock_skew_s")
}
MAX_BYTES: int = LIMITS["max_message_bytes"]
MAX_AGE_S: float = LIMITS["max_event_age_s"]
MAX_SKEW_S: float = LIMITS["max_clock_skew_s"]


def _limited(settings: Settings | None = None) -> Settings:
    return (settings or Settings()).model_copy(update=LIMITS)


CODES = {
    "empty",
    "oversize",
    "undecodable",
    "invalid_json",
    "schema",
    "unknown_schema_version",
    "too_old",
    "too_new",
}
HOSTILE_SEGMENTS = [
    "../../etc/passwd",
    "a/../../b",
    "*",
    "{x}",
    "seg:{0}:offsets",
    "w:{clicks-0}:offsets",
    "x" * 10_240,
    "emoji 🚀✓ é",
    " leading and trailing ",
    "'; DROP TABLE clicks; --",
    "\\\\server\\share",
    "%s%n%x",
    "\u202eevil",
    "a\u0085b",  # NEL: not a C0 control character, so allowed
]


# ------------------------------------------------------------------------------------------ messages


@dataclass
class Msg:
    """One produced message; `code` is the expected DLQ reason, None for a valid event."""

    kind: str
    key: bytes | None
    value: bytes | None
    code: str | None
    doc: dict[str, Any] | None = None  # valid events and duplicates: the event as sent

    @property
    def valid(self) -> bool:
        return self.code is None

    def __repr__(self) -> str:  # short: hypothesis prints whole batches on failure
        shown = self.value if self.value is None or len(self.value) <= 80 else self.value[:80] + b"..."
        return f"Msg({self.kind!r}, {self.code!r}, {shown!r})"


def _ts_iso(offset_s: float, form: int) -> str | int:
    when = datetime.now(UTC) + timedelta(seconds=offset_s)
    if form == 0:
        return when.isoformat()
    if form == 1:
        return when.strftime("%Y-%m-%dT%H:%M:%SZ")
    if form == 2:
        return when.replace(tzinfo=None).isoformat()  # naive: read as UTC
    if form == 3:
        return when.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()
    if form == 4:
        return when.astimezone(timezone(timedelta(hours=-11))).strftime("%Y-%m-%dT%H:%M:%S.%f%z")
    return int(when.timestamp())  # a Unix timestamp number: pydantic reads it as UTC


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_seg_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30)


@st.composite
def valid_doc(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event without its event_id (assigned later, unique per batch)."""
    margin = 3600.0
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["schema_version"] = 1
    offset = draw(st.floats(-MAX_AGE_S + margin, MAX_SKEW_S - margin))
    doc["ts"] = _ts_iso(offset, draw(st.integers(0, 5)))
    doc["segment"] = draw(st.sampled_from(HOSTILE_SEGMENTS) | _seg_text | st.sampled_from(["a", "b", "c"]))
    query = draw(st.sampled_from(["absent", "none", "empty", "text", "long"]))
    if query != "absent":
        doc["query"] = {"none": None, "empty": "", "text": draw(_text), "long": "q" * 2048}[query]
    doc["item_id"] = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
    doc["item_text"] = draw(
        st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40) | st.just("t" * 8192)
    )
    doc["clicked"] = draw(st.integers(0, 1))
    return doc


def _base(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "bad",
        "ts": datetime.now(UTC).isoformat(),
        "segment": "bad-seg",
        "query": "q",
        "item_id": "i",
        "item_text": "t",
        "clicked": 1,
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not _DROP}


_DROP = object()
_INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\x80",
    b"\xe2\x82",
]
_WRONG = [None, 1, -1, 1.5, True, [], {}, ["a"], {"a": 1}]


def _nest(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


@st.composite
def bad_message(draw: st.DrawFn) -> Msg:
    """One hostile message and the reason code it must get."""
    kind = draw(
        st.sampled_from(
            [
                "wrong_type",
                "huge_string",
                "control_char",
                "invalid_utf8",
                "deep_nesting",
                "deep_field",
                "non_object",
                "empty",
                "empty_bytes",
                "too_old",
                "too_new",
                "label",
                "schema_version",
                "extra_field",
                "missing_field",
                "oversize",
                "garbage",
                "truncated",
                "raw_control",
            ]
        )
    )
    key = draw(st.none() | st.binary(max_size=16))
    if kind == "wrong_type":
        field = draw(st.sampled_from(["event_id", "ts", "segment", "query", "item_id", "item_text"]))
        wrong = draw(st.sampled_from([w for w in _WRONG if w is not None or field != "query"]))
        if field == "ts" and type(wrong) in (int, float):
            wrong = "yesterday"  # numbers are Unix timestamps, a valid form
        return Msg(kind, key, orjson.dumps(_base(**{field: wrong})), "schema")
    if kind == "huge_string":
        field, limit = draw(
            st.sampled_from(
                [
                    ("event_id", 256),
                    ("item_id", 256),
                    ("item_text", 8192),
                    ("query", 2048),
                    ("segment", 16_384),
                ]
            )
        )
        extra = draw(st.integers(1, 3000))
        char = draw(st.sampled_from(["x", "é", "🚀"]))  # limits count characters, not bytes
        value = orjson.dumps(_base(**{field: char * (limit + extra)}))
        return Msg(kind, key, value, "oversize" if len(value) > MAX_BYTES else "schema")
    if kind == "control_char":
        ch = draw(st.sampled_from([chr(c) for c in [*range(0x20), 0x7F]]))
        seg = draw(st.sampled_from(["", "seg", "../"])) + ch + draw(st.sampled_from(["", "x"]))
        return Msg(kind, key, orjson.dumps(_base(segment=seg)), "schema")
    if kind == "invalid_utf8":
        bad = draw(st.sampled_from(_INVALID_UTF8))
        field = draw(st.sampled_from(["segment", "item_text", "event_id", "query"]))
        value = orjson.dumps(_base(**{field: "MARK"})).replace(b"MARK", b"a" + bad + b"z")
        return Msg(kind, key, value, "undecodable")
    if kind == "deep_nesting":
        depth = draw(st.sampled_from([1025, 5000, 10_000]))
        inner = draw(st.sampled_from([b"1", b"{}", b'"x"']))
        if draw(st.booleans()):
            return Msg(kind, key, _nest(depth, inner), "invalid_json")
        return Msg(kind, key, b'{"a":' * depth + inner + b"}" * depth, "invalid_json")
    if kind == "deep_field":
        # Deep but within orjson's limit: valid JSON, a schema error (wrong type or forbidden field).
        depth = draw(st.integers(2, 1000))
        field = draw(st.sampled_from(["item_text", "query", "extra"]))
        value = orjson.dumps(_base(**{field: "MARK"})).replace(b'"MARK"', _nest(depth))
        return Msg(kind, key, value, "schema")
    if kind == "non_object":
        value = draw(
            st.sampled_from(
                [
                    b"[]",
                    b"[1,2]",
                    b'"event"',
                    b"1",
                    b"-0.5",
                    b"null",
                    b"true",
                    b"false",
                    b"123456789012345678901234567890",
                ]
            )
            | st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5).map(orjson.dumps)
            | _text.map(orjson.dumps)
        )
        return Msg(kind, key, value, "schema")
    if kind == "empty":
        return Msg(kind, key, None, "empty")
    if kind == "empty_bytes":
        return Msg(kind, key, draw(st.sampled_from([b"", b" ", b"\n\t "])), "invalid_json")
    if kind == "too_old":
        ts = draw(
            st.sampled_from(
                [
                    "0001-01-01T00:00:00Z",
                    "1900-01-01T00:00:00",
                    "1970-01-01T00:00:00Z",
                    "2001-09-09T01:46:40+00:00",
                ]
            )
            | st.integers(2, 1000).map(lambda d: _ts_iso(-MAX_AGE_S - d * 86400.0, 0))
        )
        return Msg(kind, key, orjson.dumps(_base(ts=ts)), "too_old")
    if kind == "too_new":
        days, form = draw(st.integers(2, 1000)), draw(st.integers(0, 5))
        ts = draw(
            st.sampled_from(["9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999", "3000-01-01T00:00:00Z"])
            | st.just(_ts_iso(days * 86400.0, form))
        )
        return Msg(kind, key, orjson.dumps(_base(ts=ts)), "too_new")
    if kind == "label":
        label = draw(st.sampled_from([2, -1, True, False, "1", "0", 0.5, 1.0, 0.0, None, [1], 10**30]))
        value = orjson.dumps(_base(clicked="MARK")).replace(
            b'"MARK"', str(label).encode() if type(label) is int else orjson.dumps(label)
        )
        return Msg(kind, key, value, "schema")
    if kind == "schema_version":
        version = draw(st.sampled_from([2, 0, -1, 999, "1", "v1", None, [1]]))
        bad_too = draw(st.booleans())  # an unknown version wins over other errors
        doc = _base(schema_version=version, clicked=7 if bad_too else 1)
        return Msg(kind, key, orjson.dumps(doc), "unknown_schema_version")
    if kind == "extra_field":
        name = draw(st.sampled_from(["extra", "__proto__", "$where", "Clicked", "event_id ", ""]) | _text)
        if name in _base():
            name += "_"
        return Msg(kind, key, orjson.dumps({**_base(), name: draw(st.sampled_from(_WRONG))}), "schema")
    if kind == "missing_field":
        field = draw(st.sampled_from(["event_id", "ts", "segment", "item_id", "item_text", "clicked"]))
        return Msg(kind, key, orjson.dumps(_base(**{field: _DROP})), "schema")
    if kind == "oversize":
        pad = draw(st.integers(1, 4096))
        # A valid event padded with whitespace past the limit: still rejected, before any parsing.
        value = orjson.dumps(_base(event_id="big"))
        value += b" " * (MAX_BYTES - len(value) + pad)
        return Msg(kind, key, value, "oversize")
    if kind == "truncated":
        value = orjson.dumps(_base())
        cut = draw(st.integers(1, len(value) - 1))
        return Msg(kind, key, value[:cut], "invalid_json")
    if kind == "raw_control":
        # An unescaped control character inside a JSON string is not JSON.
        ch = draw(st.sampled_from([b"\x00", b"\n", b"\x1f"]))
        return Msg(kind, key, orjson.dumps(_base(segment="MARK")).replace(b"MARK", b"s" + ch), "invalid_json")
    assert kind == "garbage"
    value = draw(st.binary(min_size=1, max_size=64))
    got = decode(value, _limited(), time.time())
    assert isinstance(got, Rejection)
    return Msg(kind, key, value, got.code)


@st.composite
def batch(draw: st.DrawFn, size: int) -> list[Msg]:
    """`size` messages: about a third bad, the rest valid events, some of them duplicate event ids."""
    n = draw(st.integers(size - 20, size + 20))
    out: list[Msg] = []
    valid: list[Msg] = []
    for i in range(n):
        roll = draw(st.integers(0, 99))
        if roll < 35:
            out.append(draw(bad_message()))
        elif roll < 45 and valid:
            # Same event id, same segment (so same partition), another payload: the first one wins.
            first = valid[draw(st.integers(0, len(valid) - 1))].doc
            assert first is not None
            doc = {**first, "clicked": 1 - first["clicked"], "item_text": f"dup {i}", "item_id": f"dup-{i}"}
            out.append(Msg("duplicate", doc["segment"].encode(), orjson.dumps(doc), None, doc))
        else:
            suffix = draw(st.sampled_from(["", "é", ":*{}", "\xff", "x" * 200]))
            doc = valid_doc_with_id(draw(valid_doc()), f"e{i}-{suffix}")
            # Producers key by segment (dedup's scope is the partition the key picks).
            msg = Msg("valid", doc["segment"].encode(), orjson.dumps(doc), None, doc)
            out.append(msg)
            valid.append(msg)
    return out


def valid_doc_with_id(doc: dict[str, Any], event_id: str) -> dict[str, Any]:
    return {"event_id": event_id, **doc}


# ------------------------------------------------------------------------------------------ plumbing


_serial = count()


def _isolated(settings: Settings) -> Settings:
    """Fresh topics, group and Redis prefix for one example (the fixture is per test, not per example)."""
    n = next(_serial)
    return settings.model_copy(
        update={
            **LIMITS,
            "input_topic": f"{settings.input_topic}-{n}",
            "dlq_topic": f"{settings.dlq_topic}-{n}",
            "group_id": f"{settings.group_id}-{n}",
            "redis_prefix": f"{settings.redis_prefix}x{n}",
        }
    )


def _produce(settings: Settings, msgs: list[Msg]) -> list[tuple[int, int]]:
    """Produce in order with a `test.idx` header; returns each message's (partition, offset)."""
    prod = make_producer(settings)
    where: dict[int, tuple[int, int]] = {}
    errors: list[str] = []

    def delivered(idx: int) -> Any:
        def cb(err: Any, m: Any) -> None:
            if err is not None:
                errors.append(f"{idx}: {err}")
            else:
                where[idx] = (m.partition(), m.offset())

        return cb

    for i, m in enumerate(msgs):
        while True:
            try:
                prod.produce(
                    settings.input_topic,
                    key=m.key,
                    value=m.value,
                    headers=[("test.idx", str(i).encode())],
                    on_delivery=delivered(i),
                )
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    assert prod.flush(60) == 0
    assert not errors, errors[:5]
    return [where[i] for i in range(len(msgs))]


def _read_topic(settings: Settings, topic: str, timeout_s: float = 60.0) -> list[Any]:
    """Every message of a topic up to its current end (assigned, no consumer group join)."""
    marks = high_watermarks(settings, topic)
    consumer = make_consumer(settings, **{"group.id": f"{settings.group_id}-dlq-reader"})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in marks])
    out: list[Any] = []
    done = {p for p, end in marks.items() if end == 0}
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < len(marks):
            assert time.monotonic() < deadline, f"DLQ not read to its end: {marks}"
            for m in consumer.consume(1000, 0.5):
                if m.error() is not None:
                    continue
                out.append(m)
                if m.offset() + 1 >= marks[m.partition()]:
                    done.add(m.partition())
    finally:
        consumer.close()
    return out


def _drop_topics(settings: Settings, topics: list[str]) -> None:
    futures = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).delete_topics(topics)
    for f in futures.values():
        with contextlib.suppress(Exception):
            f.result(10)


def _run_and_check(settings: Settings, msgs: list[Msg]) -> None:
    s = _isolated(settings)
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=PARTITIONS)
    try:
        where = _produce(s, msgs)
        ingestor = ingest_all(s, timeout_s=90)  # raises if the loop dies
        buffer = ingestor.buffer
        try:
            _check(s, msgs, where, ingestor.stats, buffer)
        finally:
            buffer.purge()
    finally:
        _drop_topics(s, [s.input_topic, s.dlq_topic])


def _check(s: Settings, msgs: list[Msg], where: list[tuple[int, int]], stats: Any, buffer: Buffer) -> None:
    bad = [i for i, m in enumerate(msgs) if not m.valid]
    described = Counter(m.kind for m in msgs)

    # The loop saw everything, dead-lettered exactly the bad ones.
    assert stats.consumed == len(msgs), described
    assert stats.dead == len(bad)
    assert stats.stale == 0

    # The DLQ: each bad message once, bytes, key and headers intact, with the reason and its source.
    dead = _read_topic(s, s.dlq_topic)
    by_idx: dict[int, Any] = {}
    for d in dead:
        headers = dict(d.headers() or [])
        idx = int(headers["test.idx"])
        assert idx not in by_idx, f"message {idx} ({msgs[idx].kind}) dead-lettered twice"
        by_idx[idx] = (d, headers)
    assert sorted(by_idx) == bad, (
        f"valid events on the DLQ: {sorted(set(by_idx) - set(bad))[:5]}, "
        f"bad ones missing: {[(i, msgs[i].kind) for i in sorted(set(bad) - set(by_idx))][:5]}"
    )
    for idx, (d, headers) in by_idx.items():
        m = msgs[idx]
        reason = headers["dlq.reason"].decode()
        assert reason in CODES
        assert reason == m.code, f"{m.kind} {m.value[:120] if m.value else m.value!r}: {reason} != {m.code}"
        assert headers["dlq.message"], m.kind
        assert d.value() == m.value, m.kind
        assert d.key() == m.key, m.kind
        assert headers["dlq.source.topic"].decode() == s.input_topic
        assert (int(headers["dlq.source.partition"]), int(headers["dlq.source.offset"])) == where[idx]

    # Redis: every valid event once, duplicates counted, the first payload of an event id wins.
    first: dict[tuple[int, str], int] = {}
    per_segment: dict[tuple[int, str], dict[str, Any]] = {}
    dups = 0
    for i, m in enumerate(msgs):
        if not m.valid:
            continue
        assert m.doc is not None
        p = where[i][0]
        seg = per_segment.setdefault((p, m.doc["segment"]), {"ids": [], "pos": 0, "neg": 0, "dups": 0})
        if (p, m.doc["event_id"]) in first:
            seg["dups"] += 1
            dups += 1
            continue
        first[(p, m.doc["event_id"])] = i
        seg["ids"].append(i)
        seg["pos" if m.doc["clicked"] else "neg"] += 1

    totals = total_stats(buffer, PARTITIONS)
    assert totals.get("events", 0) == len(first)
    assert totals.get("duplicates", 0) == dups
    assert totals.get("stale", 0) == 0
    assert totals.get("dlq", 0) == len(bad)
    assert {k[4:]: v for k, v in totals.items() if k.startswith("dlq.")} == dict(
        Counter(msgs[i].code for i in bad)
    )

    stored_segments = {(p, name) for p in range(PARTITIONS) for name in buffer.segments(p)}
    assert stored_segments == {k for k, v in per_segment.items() if v["ids"]}
    for (p, name), want in per_segment.items():
        counts = buffer.counts(p, name)
        assert (counts.positives, counts.negatives, counts.duplicates) == (
            want["pos"],
            want["neg"],
            want["dups"],
        )
        sample = buffer.redis.lrange(buffer.segment_key(p, name, "sample"), 0, -1)
        assert [decode_entry(raw) for raw in sample] == [
            (1 if msgs[i].doc["clicked"] else 0, msgs[i].value)  # type: ignore[index]
            for i in want["ids"]
        ], name[:50]


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.integration
@hsettings(
    max_examples=14,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a Kafka round trip
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(msgs=batch(200))
def test_thousands_of_hostile_messages_never_kill_ingest_or_lose_an_event(
    settings: Settings, msgs: list[Msg]
) -> None:
    event("messages per example", len(msgs))
    _run_and_check(settings, msgs)


def _one_of_each() -> list[tuple[str, bytes | None, str]]:
    """(kind, value, the exact reason code) for each kind of bad input."""
    now = datetime.now(UTC)
    big = orjson.dumps(_base(event_id="big"))
    return [
        ("empty (no value)", None, "empty"),
        ("empty bytes", b"", "invalid_json"),
        ("oversize", big + b" " * (MAX_BYTES - len(big) + 1), "oversize"),
        ("invalid UTF-8", orjson.dumps(_base(segment="MARK")).replace(b"MARK", b"\xff\xfe"), "undecodable"),
        (
            "lone surrogate bytes",
            orjson.dumps(_base(item_text="MARK")).replace(b"MARK", b"\xed\xa0\x80"),
            "undecodable",
        ),
        (
            "escaped lone surrogate",
            orjson.dumps(_base(event_id="MARK")).replace(b"MARK", b"\\ud800"),
            "invalid_json",
        ),
        ("not JSON", b"{event_id: 1}", "invalid_json"),
        ("truncated", orjson.dumps(_base())[:-3], "invalid_json"),
        (
            "raw newline in a string",
            orjson.dumps(_base(segment="MARK")).replace(b"MARK", b"a\nb"),
            "invalid_json",
        ),
        ("10,000 nested arrays", _nest(10_000), "invalid_json"),
        ("10,000 nested objects", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "invalid_json"),
        (
            "10,000 nested in a field",
            orjson.dumps(_base(query="MARK")).replace(b'"MARK"', _nest(10_000)),
            "invalid_json",
        ),
        ("500 nested in a field", orjson.dumps(_base(query="MARK")).replace(b'"MARK"', _nest(500)), "schema"),
        ("array", b"[1,2,3]", "schema"),
        ("string", b'"click"', "schema"),
        ("number", b"42", "schema"),
        ("null", b"null", "schema"),
        ("wrong type: event_id int", orjson.dumps(_base(event_id=17)), "schema"),
        ("wrong type: segment list", orjson.dumps(_base(segment=["a"])), "schema"),
        ("wrong type: ts object", orjson.dumps(_base(ts={"y": 2024})), "schema"),
        ("wrong type: item_text null", orjson.dumps(_base(item_text=None)), "schema"),
        ("huge event_id", orjson.dumps(_base(event_id="e" * 257)), "schema"),
        ("huge item_text", orjson.dumps(_base(item_text="t" * 8193)), "schema"),
        ("huge query", orjson.dumps(_base(query="q" * 2049)), "schema"),
        ("huge segment", orjson.dumps(_base(segment="s" * 16_385)), "schema"),
        ("empty segment", orjson.dumps(_base(segment="")), "schema"),
        ("NUL in segment", orjson.dumps(_base(segment="a\x00b")), "schema"),
        ("newline in segment", orjson.dumps(_base(segment="a\nb")), "schema"),
        ("DEL in segment", orjson.dumps(_base(segment="a\x7f")), "schema"),
        ("ESC in segment", orjson.dumps(_base(segment="\x1b[31mred")), "schema"),
        ("label 2", orjson.dumps(_base(clicked=2)), "schema"),
        ("label -1", orjson.dumps(_base(clicked=-1)), "schema"),
        ("label true", orjson.dumps(_base(clicked=True)), "schema"),
        ("label '1'", orjson.dumps(_base(clicked="1")), "schema"),
        ("label 0.5", orjson.dumps(_base(clicked=0.5)), "schema"),
        ("label 1.0", orjson.dumps(_base(clicked=1.0)), "schema"),
        ("label null", orjson.dumps(_base(clicked=None)), "schema"),
        (
            "label 10**30",
            orjson.dumps(_base(clicked="MARK")).replace(b'"MARK"', str(10**30).encode()),
            "schema",
        ),
        ("schema_version 2", orjson.dumps(_base(schema_version=2)), "unknown_schema_version"),
        ("schema_version true", orjson.dumps(_base(schema_version=True)), "unknown_schema_version"),
        ("schema_version 1.0", orjson.dumps(_base(schema_version=1.0)), "unknown_schema_version"),
        ("schema_version '1'", orjson.dumps(_base(schema_version="1")), "unknown_schema_version"),
        ("schema_version null", orjson.dumps(_base(schema_version=None)), "unknown_schema_version"),
        (
            "schema_version 0 and a bad label",
            orjson.dumps(_base(schema_version=0, clicked=5)),
            "unknown_schema_version",
        ),
        ("extra field", orjson.dumps({**_base(), "extra": 1}), "schema"),
        ("extra __proto__", orjson.dumps({**_base(), "__proto__": {"admin": True}}), "schema"),
        ("missing clicked", orjson.dumps(_base(clicked=_DROP)), "schema"),
        ("too old: year 1", orjson.dumps(_base(ts="0001-01-01T00:00:00Z")), "too_old"),
        ("too old: 2 years", orjson.dumps(_base(ts=(now - timedelta(days=730)).isoformat())), "too_old"),
        ("too old: epoch number", orjson.dumps(_base(ts=0)), "too_old"),
        ("too new: year 9999", orjson.dumps(_base(ts="9999-12-31T23:59:59Z")), "too_new"),
        ("too new: in 2 days", orjson.dumps(_base(ts=(now + timedelta(days=2)).isoformat())), "too_new"),
        ("bad ts string", orjson.dumps(_base(ts="yesterday")), "schema"),
        ("ts month 13", orjson.dumps(_base(ts="2024-13-01T00:00:00Z")), "schema"),
    ]


ONE_OF_EACH = _one_of_each()


@pytest.mark.parametrize(("kind", "value", "code"), ONE_OF_EACH, ids=[k for k, _, _ in ONE_OF_EACH])
def test_decode_gives_the_exact_reason_per_kind(kind: str, value: bytes | None, code: str) -> None:
    got = decode(value, _limited(), time.time())
    assert isinstance(got, Rejection), kind
    assert got.code == code, f"{kind}: {got}"
    assert got.message


def _schema_fields(doc: dict[str, Any]) -> set[str]:
    """The fields an independent validator (jsonschema, on the published schema) finds at fault."""
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(__file__).parents[1] / "schemas" / "click-event.v1.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    fields = {str(e.path[0]) for e in errors if e.path}
    fields |= set(schema["required"]) - set(doc)
    fields |= set(doc) - set(schema["properties"])
    return fields


def test_a_dead_letter_names_every_violation_like_an_independent_validator() -> None:
    doc = {
        "schema_version": 1,
        "event_id": 17,
        "ts": [1],
        "segment": "",
        "item_text": None,
        "clicked": 2,
        "query": "q",
        "extra": 1,
    }  # seven faults: event_id, ts, segment, item_text, clicked, extra, and item_id missing
    got = decode(orjson.dumps(doc), _limited(), time.time())
    assert isinstance(got, Rejection) and got.code == "schema"
    named = {part.split(":", 1)[0] for part in got.message.split("; ")}
    assert named == _schema_fields(doc)
    assert len(named) == 7, got.message


def test_a_dead_letter_reason_is_bounded_and_counts_what_it_leaves_out() -> None:
    from worker.stream.decode import DLQ_MESSAGE_MAX_CHARS

    doc = {**_base(), **{f"unknown_{i:04d}_" + "x" * 300: i for i in range(3000)}}
    got = decode(orjson.dumps(doc), _limited().model_copy(update={"max_message_bytes": 10**7}), time.time())
    assert isinstance(got, Rejection) and got.code == "schema"
    assert len(got.message) <= DLQ_MESSAGE_MAX_CHARS
    parts = got.message.split("; ")
    assert parts[-1].startswith("and ") and parts[-1].endswith(" more")
    left_out = int(parts[-1].split()[1])
    assert len(parts) - 1 + left_out == 3000
    assert all(p.startswith("unknown_") and len(p.split(":", 1)[0]) <= 203 for p in parts[:-1])


@pytest.mark.parametrize(
    "ts",
    ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00"],
)
def test_timestamps_at_the_bounds_of_datetime_are_rejected_not_raised(ts: str) -> None:
    got = decode(orjson.dumps(_base(ts=ts)), _limited(), time.time())
    assert isinstance(got, Rejection) and got.code in {"too_old", "too_new", "schema"}


@pytest.mark.integration
def test_one_of_each_bad_kind_through_kafka_gets_its_exact_reason(settings: Settings) -> None:
    msgs = [
        Msg(kind, f"k{i}".encode() if i % 2 else None, value, code)
        for i, (kind, value, code) in enumerate(ONE_OF_EACH)
    ]
    valid_docs = [
        valid_doc_with_id(
            {
                "ts": datetime.now(UTC).isoformat(),
                "segment": seg,
                "item_id": "i",
                "item_text": "t",
                "clicked": c,
            },
            f"ok-{n}",
        )
        for n, (seg, c) in enumerate([("a", 1), ("../../etc/passwd", 0), ("{x}", 1), ("seg:{0}:offsets", 0)])
    ]
    mixed: list[Msg] = []
    for i, m in enumerate(msgs):
        mixed.append(m)
        if i % 12 == 0:
            doc = valid_docs[i // 12 % len(valid_docs)]
            if any(x.doc is not None and x.doc["event_id"] == doc["event_id"] for x in mixed):
                doc = {**doc, "clicked": 1 - doc["clicked"], "item_text": "second"}  # a duplicate: first wins
            mixed.append(Msg("valid", doc["segment"].encode(), orjson.dumps(doc), None, doc))
    assert sum(1 for m in mixed if m.valid) >= 4
    _run_and_check(settings, mixed)


def test_valid_doc_strategy_only_makes_valid_events() -> None:
    """Guards the property test: what it calls valid, `decode` accepts (checked without Kafka)."""

    @hsettings(max_examples=300, deadline=None, database=None)
    @given(doc=valid_doc())
    def check(doc: dict[str, Any]) -> None:
        got = decode(orjson.dumps(valid_doc_with_id(doc, "e")), _limited(), time.time())
        assert isinstance(got, ClickEvent), got

    check()
