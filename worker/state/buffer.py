"""Per-segment state in Redis: new events, a longer sample, candidates, counts, dedup and stored offsets.

Layout (all keys start with `settings.redis_prefix`; `{<topic>-<partition>}` is the Redis Cluster hash
tag, so one partition's events and its offsets live in one slot and change in one script):

    P:{T-p}:offsets          hash  next = the next input offset to consume (covers events *and* dead letters),
                                   epoch = the owner epoch (`acquire`, one more per assignment)
    P:{T-p}:dedup            zset  event_id -> first-seen time (ms)
    P:{T-p}:stats            hash  events, duplicates, stale, dlq, dlq.<code>
    P:{T-p}:segs             set   segment hashes seen on the partition
    P:{T-p}:active           zset  segment hash -> when it last got an event (ms; `expire_idle`)
    P:{T-p}:seg:<h>:meta     hash  name, seq, pos, neg, new_pos, new_neg, dropped, duplicates, ncand, ...
    P:{T-p}:seg:<h>:new      list  events since the last training, oldest first (`<label><json>`)
    P:{T-p}:seg:<h>:sample   list  the last `sample_cap` events of the segment, oldest first
    P:{T-p}:seg:<h>:cand     hash  query/item pair -> latest event carrying it (`<label><json>`)
    P:{T-p}:seg:<h>:candz    zset  pair -> sequence number of its latest sighting (evicts the stalest)

`<h>` is a hash of the segment name, which is stored only as data: any string (`:`, `*`, `{`, newlines,
10 kB) is safe. Every stored event gets the next per-segment sequence number; both lists always hold a
contiguous run ending at `seq`, so numbers need not be stored per element.

Dedup uses one time-windowed sorted set per partition rather than a Bloom filter or a key per id: it is
exact (a Bloom false positive would silently drop a valid event), it is trimmed by age (`dedup_ttl_s`)
and by size (`dedup_max_ids`) inside the same script, so memory is bounded, and it lives in the
partition's slot, so the check and the write are one atomic step. Producers key by segment, so a
redelivered event comes back on the same partition; dedup's scope is the partition.

The buffer is one class, `Buffer`, made of one part per concern, each in its own module:
`buffer_write` (the write script, offsets and owner epochs), `buffer_training` (new events, the sample,
candidates and the marks training sets), `buffer_counts` (stored offsets, counters, segment listings),
`buffer_maintenance` (expiry of idle segments, purge); `buffer_keys` builds their keys and
`buffer_transport` sends the write scripts. The names callers use are importable from here.
"""

from __future__ import annotations

from worker.state.buffer_counts import BufferCounts, SegmentCounts
from worker.state.buffer_maintenance import BufferMaintenance
from worker.state.buffer_training import BufferTraining, Candidate, Snapshot
from worker.state.buffer_write import (
    BufferWrites,
    InflightWrite,
    PartitionWrite,
    Pending,
    SegmentState,
    WriteResult,
)

__all__ = [
    "Buffer",
    "Candidate",
    "InflightWrite",
    "PartitionWrite",
    "Pending",
    "SegmentCounts",
    "SegmentState",
    "Snapshot",
    "WriteResult",
]


class Buffer(BufferWrites, BufferTraining, BufferCounts, BufferMaintenance):
    """The consumer's Redis state. Safe to share between threads: redis-py pools connections."""
