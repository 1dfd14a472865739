"""The buffer's per-event formats: the `<label><json>` list entry and the candidate's pair key.

An entry is one label byte (`1` clicked, `0` not) and the event's JSON as it arrived, so the scripts can
count clicks without parsing JSON (`entry.lua` is their half of this format) and the stored bytes are the
producer's. Nothing here talks to Redis: the decoder needs neither client.
"""

from __future__ import annotations

import orjson

_CLICKED = b"1"
_NOT_CLICKED = b"0"


def encode_entry(clicked: int, payload: bytes) -> bytes:
    return (_CLICKED if clicked else _NOT_CLICKED) + payload


def decode_entry(raw: bytes) -> tuple[int, bytes]:
    """(clicked, the event's JSON) of a stored entry; an unknown label is corrupt data, not a guess."""
    label = raw[:1]
    if label == _CLICKED:
        return 1, raw[1:]
    if label == _NOT_CLICKED:
        return 0, raw[1:]
    raise ValueError(f"buffer entry with unknown label {label!r}")


def pair_key(query: str | None, item_id: str) -> bytes:
    """The identity of a candidate: the query (None and "" differ) and the item id, unambiguously."""
    return orjson.dumps([query, item_id])
