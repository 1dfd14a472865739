"""Synthetic click events for the benchmarks: the shape and size of real ones, any number, no data set."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import orjson

_WORDS = [
    "drill",
    "cordless",
    "brushless",
    "ladder",
    "faucet",
    "kitchen",
    "pendant",
    "light",
    "ceiling",
    "fan",
    "hex",
    "bolt",
    "stainless",
    "steel",
    "outdoor",
    "patio",
    "door",
    "knob",
    "deadbolt",
    "garden",
    "hose",
    "nozzle",
    "vinyl",
    "plank",
    "flooring",
    "white",
    "gloss",
]


def synthetic_events(n: int, segments: int, seed: int = 0) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs shaped like the Home Depot events: distinct ids, ~250-byte JSON, current time."""
    rng = random.Random(seed)
    now = datetime.now(UTC).isoformat()
    names = [f"brand-{i:04d}" for i in range(segments)]
    out = []
    for i in range(n):
        seg = names[rng.randrange(segments)]
        doc = {
            "schema_version": 1,
            "event_id": f"bench-{seed}-{i}",
            "ts": now,
            "segment": seg,
            "query": " ".join(rng.choices(_WORDS, k=3)),
            "item_id": str(100000 + rng.randrange(5000)),
            "item_text": " ".join(rng.choices(_WORDS, k=9)),
            "clicked": rng.randrange(2),
        }
        out.append((seg.encode(), orjson.dumps(doc)))
    return out
