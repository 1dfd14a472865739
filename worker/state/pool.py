"""What one shared run trains on, read from every partition's buffers with a bounded footprint.

The group's shared trainer pools every segment of every partition, whoever owns it. Reading all of it
grows with the segments: at up to 8,192 buffered events a segment and about 1.4 kB an event in memory, a
thousand busy segments exhaust a worker. So one run reads at most `shared_pool_max_events` events in all
and at most `shared_pool_segment_cap` from one segment, the newest first. The per-segment share is the
largest that keeps the total within its bound (`fair_share`, water-filling): a small segment keeps all
its events, and only the large ones are cut, to the same share, so small segments keep their voice. What
a segment holds beyond its share is not trained on by this run and counts as taken (its mark moves past).
With more segments than the bound (share below one event), a random subset of as many segments as the
bound gives its newest event each, drawn anew every run; the others' marks stay, so their events are new
to a later run.

Whether a run is due is counted cheaply (`group_new`): each partition's `events` counter against the
counter the last run took, one read per partition, never per segment.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from worker.config import Settings
from worker.events import ClickEvent

if TYPE_CHECKING:
    from worker.state.buffer import Buffer


class Pool(NamedTuple):
    new: list[ClickEvent]
    """Events buffered since the group's last shared run took its marks."""
    older: list[ClickEvent]
    marks: dict[tuple[int, str], int]
    """(partition, segment hash) -> the last sequence number this run has read."""
    partitions: list[int]
    """Partitions that gave new events."""
    counters: dict[int, int]
    """partition -> its `events` counter before this run read it."""


def fair_share(sizes: Sequence[int], total: int) -> int:
    """The largest share `c` with `sum(min(n, c) for n in sizes) <= total`."""
    if sum(sizes) <= total:
        return max(sizes, default=0)
    remaining, left = total, len(sizes)
    for n in sorted(sizes):
        if n * left > remaining:
            return remaining // left
        remaining -= n
        left -= 1
    return 0


def buffer_depth(settings: Settings) -> int:
    """A segment's newest events its buffer can give a shared run (its sample or its new events)."""
    return max(settings.sample_cap, settings.new_events_cap)


def segment_share(sizes: Sequence[int], settings: Settings) -> int:
    """The most events one shared run takes from one segment, given what each segment holds: the fair
    share of `shared_pool_max_events`, at most `shared_pool_segment_cap` (0: more segments than events)."""
    return min(settings.shared_pool_segment_cap, fair_share(sizes, settings.shared_pool_max_events))


def pool(buffer: Buffer, partitions: int, settings: Settings) -> Pool:
    """Every segment's newest events, at most its share, split into new (by the group's marks) and older."""
    counters = buffer.events_counters(range(partitions))
    seen = buffer.shared_seen()
    depth = buffer_depth(settings)
    states = [(p, st) for p in range(partitions) for st in buffer.segment_states(p)]
    sizes = [min(st.seq, depth) for _, st in states]
    share = segment_share(sizes, settings)
    chosen = [i for i, size in enumerate(sizes) if size > 0]
    if share == 0 and chosen:
        share = 1
        draw = random.Random(sum(counters.values()))
        chosen = sorted(draw.sample(chosen, min(len(chosen), settings.shared_pool_max_events)))
    new: list[ClickEvent] = []
    older: list[ClickEvent] = []
    marks: dict[tuple[int, str], int] = {}
    with_new: set[int] = set()
    for i in chosen:
        (p, st), size = states[i], sizes[i]
        events, seq_to = buffer.recent(p, st.segment, min(size, share))
        key = (p, buffer.segment_hash(st.segment))
        fresh = max(0, min(len(events), seq_to - seen.get(key, 0)))
        older.extend(events[: len(events) - fresh])
        new.extend(events[len(events) - fresh :])
        marks[key] = seq_to
        if fresh:
            with_new.add(p)
    return Pool(new, older, marks, sorted(with_new), counters)


def group_new(buffer: Buffer, partitions: int) -> int:
    """Events buffered in the whole group since the last shared run pooled (one read per partition)."""
    taken = buffer.shared_counted()
    return sum(max(0, n - taken.get(p, 0)) for p, n in buffer.events_counters(range(partitions)).items())
