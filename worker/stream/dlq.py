"""The dead-letter record: one format for whatever the worker sends to the DLQ (input it rejected, score
requests it could not answer), so one reader and one re-drive handle all of them.

The record is the message's key, bytes and headers as they came, plus `dlq.source.topic`, `.partition`,
`.offset`, `dlq.reason` (a code) and `dlq.message` (for people). It always fits in `max_bytes` (the
largest record the producer sends, `worker.stream.kafka.max_record_bytes`): a message near the broker's
limit would not fit with these headers added, and the DLQ would refuse it. So the key is cut to
`KEY_CAP`, headers over a quarter of the budget are dropped, and the value is cut to what is left; each
cut is named in a header with the original size (`dlq.truncated.key`, `dlq.headers.dropped`,
`dlq.truncated.value`). Anything that fits is kept whole, so it can be re-driven as it was.

A re-driven message (`python -m worker dlq redrive`) carries `dlq.redrive.count`; when it fails again,
its dead letter keeps that header even where the other headers are dropped, so re-drive can stop at a cap
instead of looping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

Header = tuple[str, str | bytes | None]
KEY_CAP = 4096
"""Bytes of a message key kept (keys are segment names; a longer one is cut)."""
MESSAGE_CHARS = 8000
"""`dlq.message` is cut here (a schema error lists every violation, already cut to this by decode)."""
DLQ_HEADER_PREFIX = "dlq."
"""Every header the dead-letter path adds starts with this; re-drive strips them from the original."""
REDRIVE_COUNT = "dlq.redrive.count"
"""How often the message was re-driven; re-drive sends it with this plus one."""
TRUNCATION_HEADERS = ("dlq.truncated.key", "dlq.truncated.value", "dlq.headers.dropped")


class DeadLetter(NamedTuple):
    key: bytes | None
    value: bytes | None
    headers: list[Header]


RECORD_OVERHEAD = 1024
"""Bytes kept free for the record's framing and the truncation header (Kafka's framing is under 100)."""


def dead_letter(msg: Message, reason: str, message: str, max_bytes: int) -> DeadLetter:
    value: bytes | None = msg.value()
    key: bytes | None = msg.key()
    original: list[Header] = list(msg.headers() or [])  # type: ignore[arg-type]
    headers = original
    if _size(original) > max_bytes // 4:
        headers = [("dlq.headers.dropped", str(len(original)).encode())]
        count = _last(original, REDRIVE_COUNT)
        if count is not None and len(count) <= 20:
            headers.append((REDRIVE_COUNT, count))
    if key is not None and len(key) > KEY_CAP:
        headers.append(("dlq.truncated.key", str(len(key)).encode()))
        key = key[:KEY_CAP]
    headers += [
        ("dlq.source.topic", str(msg.topic()).encode()),
        ("dlq.source.partition", str(msg.partition()).encode()),
        ("dlq.source.offset", str(msg.offset()).encode()),
        ("dlq.reason", reason.encode()),
        ("dlq.message", message[:MESSAGE_CHARS].encode("utf-8", "replace")),
    ]
    room = max_bytes - RECORD_OVERHEAD - len(key or b"") - _size(headers)
    if value is not None and len(value) > room:
        headers.append(("dlq.truncated.value", str(len(value)).encode()))
        value = value[: max(0, room)]
    return DeadLetter(key, value, headers)


def _size(headers: list[Header]) -> int:
    return sum(len(k) + len(v or b"") for k, v in headers)


def _last(headers: list[Header], name: str) -> bytes | None:
    """The last value of header `name`: the dead-letter path appends its headers after the original's,
    so a `dlq.*` header a producer sent itself never shadows the worker's."""
    found: bytes | None = None
    for key, value in headers:
        if key == name:
            found = value.encode() if isinstance(value, str) else (value or b"")
    return found


@dataclass(frozen=True)
class DeadLetterRecord:
    """One record read back from the DLQ: where it sits, why it is there, and the original message."""

    partition: int
    offset: int
    timestamp_ms: int | None
    """When it was dead-lettered (the record's timestamp), None if the broker has none."""
    key: bytes | None
    value: bytes | None
    original_headers: list[Header]
    """The original's headers without any `dlq.*` header: what a re-drive sends."""
    reason: str
    message: str
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None
    redrive_count: int | None
    """0 for a message never re-driven; None if its `dlq.redrive.count` is not a count."""
    truncated: tuple[str, ...]
    """The truncation headers present: the record is not the original message as it was."""


def read_dead_letter(msg: Message) -> DeadLetterRecord:
    """Parses a DLQ record; missing or malformed source headers read as None, never raise."""
    headers: list[Header] = list(msg.headers() or [])  # type: ignore[arg-type]
    kind, ts = msg.timestamp()
    raw_count = _last(headers, REDRIVE_COUNT)
    return DeadLetterRecord(
        partition=int(msg.partition() or 0),
        offset=int(msg.offset() or 0),
        timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE else ts,
        key=msg.key(),
        value=msg.value(),
        original_headers=[(k, v) for k, v in headers if not k.startswith(DLQ_HEADER_PREFIX)],
        reason=_text(_last(headers, "dlq.reason")) or "unknown",
        message=_text(_last(headers, "dlq.message")) or "",
        source_topic=_text(_last(headers, "dlq.source.topic")),
        source_partition=_count(_last(headers, "dlq.source.partition")),
        source_offset=_count(_last(headers, "dlq.source.offset")),
        redrive_count=0 if raw_count is None else _count(raw_count),
        truncated=tuple(h for h in TRUNCATION_HEADERS if _last(headers, h) is not None),
    )


def redrive_headers(record: DeadLetterRecord) -> list[Header]:
    """The headers a re-driven message goes out with: the original's, and its re-drive count plus one."""
    assert record.redrive_count is not None
    return [*record.original_headers, (REDRIVE_COUNT, str(record.redrive_count + 1).encode())]


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace")


def _count(raw: bytes | None) -> int | None:
    """A non-negative decimal integer (at most 18 digits), else None."""
    if raw is None or not 0 < len(raw) <= 18 or not raw.isdigit():
        return None
    return int(raw)
