"""Taking a replayed range back out of a partition's buffer, so that consuming it again counts it once.

The buffer stores no offset per event; what it stores is ordered by offset: a partition's events reach
each segment in offset order, so the events the range `[new next, stored next)` stored are the last ones
of each segment (and the last entries of its lists). `worker.stream.reset` reads that range from Kafka
and says, per segment, which events it stored and how many duplicates it counted; this module checks
that against what the buffer holds (the ids at the end of each list must be those events, in order) and
takes them back in one script per partition (`reset_partition.lua`): events, counts, candidates last
seen among them, their dedup ids, the partition's counters, and the stored offset, with a new owner
epoch, so a writer that still holds the old one is refused. The script changes nothing when the stored
offset or epoch moved since the plan was read: a worker took the partition meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from worker.state import client as clients
from worker.state import keys
from worker.state.buffer import Buffer
from worker.state.entry import decode_entry
from worker.state.keys import PartitionPart
from worker.state.scripts import lua

_RESET_LUA = lua("entry.lua", "reset_partition.lua")


class ResetConflict(RuntimeError):
    """The buffer does not hold what the plan says, or changed since it was read: nothing was changed."""


@dataclass
class SegmentTakeBack:
    """What the replayed range stored in one segment (event id and label, in offset order), and how many
    of its events the segment counted as duplicates."""

    stored: list[tuple[str, int]] = field(default_factory=list)
    duplicates: int = 0


@dataclass
class PartitionReset:
    """One partition's move: from the stored next offset to `new_next`, and what that takes back."""

    partition: int
    stored_next: int | None
    epoch: int | None
    new_next: int
    segments: dict[str, SegmentTakeBack] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    """Dead-letter code -> how many of the range's messages the counters hold under it."""

    @property
    def events(self) -> int:
        return sum(len(s.stored) for s in self.segments.values())

    @property
    def duplicates(self) -> int:
        return sum(s.duplicates for s in self.segments.values())

    @property
    def dedup_ids(self) -> list[str]:
        return [event_id for s in self.segments.values() for event_id, _ in s.stored]


class PartitionResetter:
    """Reads where a partition's buffer stands, checks a take-back against it, and applies it."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self._script = clients.register_script(buffer.redis, _RESET_LUA)

    def position(self, partition: int) -> tuple[int | None, int | None]:
        """(stored next offset, owner epoch) of a partition; None where nothing is stored."""
        raw_next, raw_epoch = self.buffer.redis.hmget(
            self.buffer.partition_key(partition, "offsets"), ["next", "epoch"]
        )
        return (None if raw_next is None else int(raw_next), None if raw_epoch is None else int(raw_epoch))

    def check(self, plan: PartitionReset) -> None:
        """Raise `ResetConflict` unless every segment stored at least the events to take back, and the
        ends of its lists are those events: a buffer that does not match the topic is left alone."""
        b, p = self.buffer, plan.partition
        for name, seg in plan.segments.items():
            if not seg.stored:
                continue
            k = len(seg.stored)
            counts = b.counts(p, name)
            if counts.seq < k:
                raise ResetConflict(
                    f"partition {p}, segment {name!r}: the range stored {k} events but the buffer holds "
                    f"{counts.seq}; the buffer does not match the topic"
                )
            tail = b.redis.lrange(b.segment_key(p, name, "sample"), -k, -1)
            expected = [event_id for event_id, _ in seg.stored[len(seg.stored) - len(tail) :]]
            found = [str(orjson.loads(decode_entry(raw)[1])["event_id"]) for raw in tail]
            if found != expected:
                raise ResetConflict(
                    f"partition {p}, segment {name!r}: the buffer's last events are not the range's "
                    "(was the topic rewritten, or the buffer restored from elsewhere?)"
                )

    def apply(self, plan: PartitionReset) -> None:
        """Take the range back and store the new offset, atomically; `ResetConflict` if a worker moved
        the partition since `position` was read (then nothing changed)."""
        b, p = self.buffer, plan.partition
        tag = keys.partition_tag(b.prefix, b.topic, p)
        parts: Sequence[PartitionPart] = ("offsets", "dedup", "stats", "segs", "active")
        ids = plan.dedup_ids
        args: list[Any] = [
            "" if plan.stored_next is None else plan.stored_next,
            "" if plan.epoch is None else plan.epoch,
            plan.new_next,
            plan.events,
            plan.duplicates,
            sum(plan.dead.values()),
            len(plan.dead),
            len(ids),
            len(plan.segments),
        ]
        for code, n in sorted(plan.dead.items()):
            args += (code, n)
        args += ids
        for name, seg in plan.segments.items():
            h = b.segment_hash(name)
            clicks = sum(clicked for _, clicked in seg.stored)
            args += (h, keys.segment_key_base(tag, h), len(seg.stored), clicks, seg.duplicates)
        reply = self._script(keys=[keys.partition_key(tag, part) for part in parts], args=args)
        if reply != b"ok":
            raise ResetConflict(
                f"partition {p} changed since the plan was read (a worker took it?): nothing changed there"
            )

    def cap_shared_marks(self, plans: Sequence[PartitionReset]) -> None:
        """Shared runs must see the events consumed again as new: lower their marks to what remains."""
        b = self.buffer
        seen = b.shared_seen()
        lowered: dict[str, int] = {}
        for plan in plans:
            for name in plan.segments:
                mark = seen.get((plan.partition, b.segment_hash(name)))
                if mark is not None:
                    left = b.counts(plan.partition, name).seq
                    if mark > left:
                        lowered[f"{plan.partition}:{b.segment_hash(name)}"] = left
        counted = b.shared_counted()
        now = b.events_counters([plan.partition for plan in plans])
        lowered_counted = {str(p): n for p, n in now.items() if counted.get(p, 0) > n}
        pipe = b.redis.pipeline(transaction=False)
        if lowered:
            pipe.hset(keys.shared_seen_key(b.prefix, b.topic), mapping=lowered)  # type: ignore[arg-type]
        if lowered_counted:
            pipe.hset(keys.shared_counted_key(b.prefix, b.topic), mapping=lowered_counted)  # type: ignore[arg-type]
        pipe.execute()
