"""The dead-letter record: one format for whatever the worker sends to the DLQ (input it rejected, score
requests it could not answer), so one reader and one re-drive handle all of them.

The record is the message's key, bytes and headers as they came, plus `dlq.source.topic`, `.partition`,
`.offset`, `dlq.reason` (a code) and `dlq.message` (for people). It always fits in `max_bytes` (the
largest record the producer sends, `worker.stream.kafka.max_record_bytes`): a message near the broker's
limit would not fit with these headers added, and the DLQ would refuse it. So the key is cut to
`KEY_CAP`, headers over a quarter of the budget are dropped, and the value is cut to what is left; each
cut is named in a header with the original size (`dlq.truncated.key`, `dlq.headers.dropped`,
`dlq.truncated.value`). Anything that fits is kept whole, so it can be re-driven as it was.
"""

from __future__ import annotations

from typing import NamedTuple

from confluent_kafka import Message

Header = tuple[str, str | bytes | None]
KEY_CAP = 4096
"""Bytes of a message key kept (keys are segment names; a longer one is cut)."""
MESSAGE_CHARS = 8000
"""`dlq.message` is cut here (a schema error lists every violation, already cut to this by decode)."""


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
