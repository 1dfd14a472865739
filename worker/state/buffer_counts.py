"""What a partition holds: its stored offsets, counters and segments, and each segment's counts.

All of these only read, but the mark of the shared version a partition's scores were last refreshed for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from worker.state import keys
from worker.state.buffer_keys import BufferKeys
from worker.state.buffer_write import SegmentState


@dataclass(frozen=True)
class SegmentCounts:
    segment: str
    events: int
    positives: int
    negatives: int
    new: int
    new_positives: int
    new_negatives: int
    dropped: int
    duplicates: int
    seq: int
    trained_seq: int
    last_trained_ms: int
    sample: int
    candidates: int


class BufferCounts(BufferKeys):
    """Offsets, counters and segment listings of partitions."""

    def stored_offset(self, partition: int, topic: str | None = None) -> int | None:
        """The next offset to consume for a partition, or None when this prefix has never seen it."""
        raw = self.redis.hget(self.partition_key(partition, "offsets", topic), "next")
        return None if raw is None else int(raw)

    def stored_offsets(self, partitions: Iterable[int], topic: str | None = None) -> dict[int, int | None]:
        parts = list(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hget(self.partition_key(p, "offsets", topic), "next")
        return {p: None if raw is None else int(raw) for p, raw in zip(parts, pipe.execute(), strict=True)}

    def segments(self, partition: int) -> list[str]:
        """Names of the segments stored for a partition, sorted."""
        hashes = sorted(self.redis.smembers(self.partition_key(partition, "segs")))
        tag = self._tag(partition)
        pipe = self.redis.pipeline(transaction=False)
        for h in hashes:
            pipe.hget(keys.segment_key(tag, h.decode(), "meta"), "name")
        return sorted(raw.decode("utf-8", "surrogatepass") for raw in pipe.execute() if raw is not None)

    def segment_states(self, partition: int) -> list[SegmentState]:
        """The trigger's view of every segment of a partition (used on assignment and restart)."""
        names = self.segments(partition)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(
                self.segment_key(partition, name, "meta"), "seq", "new_pos", "new_neg", "last_trained_ms"
            )
            pipe.llen(self.segment_key(partition, name, "new"))
        replies = pipe.execute()
        states = []
        for i, name in enumerate(names):
            seq, new_pos, new_neg, trained = (int(v or 0) for v in replies[2 * i])
            states.append(
                SegmentState(partition, name, seq, int(replies[2 * i + 1]), new_pos, new_neg, trained)
            )
        return states

    def segment_state(self, partition: int, segment: str) -> SegmentState | None:
        """The trigger's view of one segment, None when nothing was ever stored for it."""
        c = self.counts(partition, segment)
        if c.seq == 0:
            return None
        return SegmentState(
            partition, segment, c.seq, c.new, c.new_positives, c.new_negatives, c.last_trained_ms
        )

    def counts(self, partition: int, segment: str) -> SegmentCounts:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(self.segment_key(partition, segment, "meta"))
        pipe.llen(self.segment_key(partition, segment, "new"))
        pipe.llen(self.segment_key(partition, segment, "sample"))
        pipe.zcard(self.segment_key(partition, segment, "candz"))
        meta_raw, new, sample, cands = pipe.execute()
        meta = {k.decode(): v for k, v in meta_raw.items()}

        def num(field: str) -> int:
            return int(meta.get(field, 0))

        return SegmentCounts(
            segment=segment,
            events=num("pos") + num("neg"),
            positives=num("pos"),
            negatives=num("neg"),
            new=int(new),
            new_positives=num("new_pos"),
            new_negatives=num("new_neg"),
            dropped=num("dropped"),
            duplicates=num("duplicates"),
            seq=num("seq"),
            trained_seq=num("trained_seq"),
            last_trained_ms=num("last_trained_ms"),
            sample=int(sample),
            candidates=int(cands),
        )

    def partition_stats(self, partition: int, topic: str | None = None) -> dict[str, int]:
        """events, duplicates, stale, dlq and dlq.<code> counters of one input partition."""
        raw = self.redis.hgetall(self.partition_key(partition, "stats", topic))
        return {k.decode(): int(v) for k, v in raw.items()}

    def events_counters(self, partitions: Iterable[int]) -> dict[int, int]:
        """Each partition's `events` counter: every event ever buffered there (one read per partition)."""
        parts = list(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hget(self.partition_key(p, "stats"), "events")
        return {p: int(raw or 0) for p, raw in zip(parts, pipe.execute(), strict=True)}

    def scores_shared_version(self, partition: int) -> int:
        """The shared version the partition's scores were last refreshed for (0: never)."""
        raw = self.redis.hget(self.partition_key(partition, "served"), "shared")
        return int(raw) if raw else 0

    def mark_scores_shared_version(self, partition: int, version: int) -> None:
        self.redis.hset(self.partition_key(partition, "served"), "shared", version)
