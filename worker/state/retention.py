"""Idle segments expire: a shop's long tail has thousands of segments, many of which go quiet for good,
and without expiry their buffers in Redis and their adapters in the model store would grow without bound.

A segment with no event for `segment_retention_s` loses its buffer and marks (`Buffer.expire_idle`) and
its version records, champion and adapters (`Registry.forget`); offsets, dedup, stats and its version
counter stay, so one that comes back starts afresh without reusing a version number. The last-event time
is recorded by the write script since this feature exists: a segment written before has none and never
expires until it gets an event.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import structlog

from worker.state.buffer import Buffer
from worker.state.registry import Registry

log = structlog.get_logger(__name__)

EXPIRY_BATCH = 100
"""Segments expired per partition and sweep: each costs a few Redis calls and a directory removal on the
compute thread, so a first sweep over a big backlog is spread over several."""


def sweep(
    buffer: Buffer,
    registry: Registry,
    partitions: Iterable[int],
    retention_s: int,
    on_expired: Callable[[int, str], None],
    *,
    all_partitions: Iterable[int] = (),
    epochs: Callable[[int], int | None] = lambda _: None,
    now_ms: int | None = None,
    limit: int = EXPIRY_BATCH,
) -> list[tuple[int, str]]:
    """Expire the owned `partitions`' idle segments; returns (partition, segment) of each one expired.

    Registry records are per segment name across the group: a name still stored on another of
    `all_partitions` (the topic was repartitioned) keeps them. `on_expired` drops what the worker holds
    in memory; `epochs` gives the owner epoch a partition is held under (see `Buffer.expire_idle`)."""
    if retention_s <= 0:
        return []
    now = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now - retention_s * 1000
    others = list(all_partitions)
    expired: list[tuple[int, str]] = []
    for partition in sorted(partitions):
        for segment in buffer.expire_idle(partition, cutoff, limit, epoch=epochs(partition)):
            if not _stored_elsewhere(buffer, segment, partition, others):
                registry.forget(segment)
            on_expired(partition, segment)
            expired.append((partition, segment))
    if expired:
        log.info(
            "segments expired",
            count=len(expired),
            partitions=sorted({p for p, _ in expired}),
            retention_s=retention_s,
        )
    return expired


def _stored_elsewhere(buffer: Buffer, segment: str, partition: int, partitions: list[int]) -> bool:
    others = [p for p in partitions if p != partition]
    if not others:
        return False
    h = buffer.segment_hash(segment)
    pipe = buffer.redis.pipeline(transaction=False)
    for p in others:
        pipe.sismember(buffer.partition_key(p, "segs"), h)
    return any(pipe.execute())
