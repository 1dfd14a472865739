"""How far behind the input topic each owned partition is, read from the consumer without holding the
poll loop: the gauge `ctr_worker_consumer_lag` and the alert on it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from typing import Any


def consumer_lag(
    consumer: Any,
    partitions: Iterable[int],
    buffer: Any = None,
    fallback_budget_s: float = 1.0,
    fresh: bool = False,
) -> dict[int, int]:
    """Lag per owned input partition: high watermark minus the next offset this worker will read.

    Uses confluent-kafka's cached watermarks (updated by every fetch response, no broker call). A
    partition with no fetch yet (just assigned) is asked from the broker instead, and so is every
    partition when `fresh` (ingest is paused: paused partitions are not fetched, so their cached
    watermark stops while producers go on), within `fallback_budget_s` in all, so the poll loop is never
    held for long; past the budget the cached value stands.
    Before the first message since assignment the consumer's position is unknown; the next offset stored
    in Redis (where ingest resumes) stands in, else the low watermark.
    """
    wanted = set(partitions)
    tps = [tp for tp in consumer.assignment() if tp.partition in wanted]
    if not tps:
        return {}
    stored: Mapping[int, int | None] = {}
    lags: dict[int, int] = {}
    deadline = time.monotonic() + fallback_budget_s
    for tp in consumer.position(tps):
        wm = consumer.get_watermark_offsets(tp, cached=True)
        if fresh or not wm or wm[1] < 0:
            left = deadline - time.monotonic()
            if left > 0.05:
                with contextlib.suppress(Exception):  # a broker error leaves the cached value
                    wm = consumer.get_watermark_offsets(tp, timeout=left, cached=False) or wm
            if not wm or wm[1] < 0:
                continue
        low, high = wm
        pos = tp.offset
        if pos < 0:
            if buffer is not None and not stored:
                stored = buffer.stored_offsets([t.partition for t in tps], tp.topic)
            pos = stored.get(tp.partition)
            if pos is None:
                pos = max(low, 0)
        lags[tp.partition] = max(0, high - pos)
    return lags
