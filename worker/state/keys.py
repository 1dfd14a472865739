"""Names derived from segment strings, safe for Redis keys and file paths whatever the segment is."""

from __future__ import annotations

import hashlib


def segment_hash(segment: str) -> str:
    """A fixed-length hex digest: no `:`, `*`, `/`, `..`, newline or length survives into a key or path."""
    return hashlib.blake2b(segment.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
