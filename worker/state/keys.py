"""Every Redis key the worker uses, and the hashes of segment names that go into keys and paths.

One module owns the layout, as arq keeps its key prefixes in one place: stored data is found again by
these exact strings, so changing one here is a data migration, not a refactoring. Scripts get their keys
from here too, in KEYS or as a segment's key base (`segment_key_base`) to which they append a
`SegmentPart`; no script derives a key from another one.
"""

from __future__ import annotations

import hashlib
from typing import Literal

PartitionPart = Literal["offsets", "dedup", "stats", "segs", "served", "active"]
"""`served`: which shared version the partition's published scores were last refreshed for; `active`:
segment hash -> when it last got an event (ms), what idle segments expire by (`worker.state.retention`)."""
SegmentPart = Literal["meta", "new", "sample", "cand", "candz"]
RegistryPart = Literal["next", "name", "records", "champion", "moves", "published", "serving", "pin"]
"""`moves`: how often what serves the segment changed (promotions, rollbacks, serving choices, pins);
`serving`: the segment's serving choice (`learn.choice`), absent until its first one; `published`: the outbox
pointer, a hash of the highest version whose model-version event and the `moves` whose scores Kafka
acknowledged; `pin`: an operator's pin (`state.pins`), absent unless pinned."""


def segment_hash(segment: str) -> str:
    """A fixed-length hex digest: no `:`, `*`, `/`, `..`, newline or length survives into a key or path."""
    return hashlib.blake2b(segment.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def prefix_pattern(prefix: str) -> str:
    """The SCAN/ACL pattern of every key under `prefix`."""
    return f"{prefix}:*"


def partition_tag(prefix: str, topic: str, partition: int) -> str:
    """`P:{T-p}`: the braces are the Redis Cluster hash tag, so a partition's keys share one slot."""
    return f"{prefix}:{{{topic}-{partition}}}"


def partition_key(tag: str, part: PartitionPart) -> str:
    return f"{tag}:{part}"


def segment_key_base(tag: str, seg_hash: str) -> str:
    """What a segment's keys start with; a key is the base and a `SegmentPart`, nothing between."""
    return f"{tag}:seg:{seg_hash}:"


def segment_key(tag: str, seg_hash: str, part: SegmentPart) -> str:
    return segment_key_base(tag, seg_hash) + part


def registry_key(prefix: str, seg_hash: str, part: RegistryPart) -> str:
    """A registry key of one segment; the hash is its hash tag, so a segment's keys share one slot."""
    return f"{prefix}:reg:{{{seg_hash}}}:{part}"


def registry_index_key(prefix: str) -> str:
    """The hash of segment hash -> name over every segment the registry has seen."""
    return f"{prefix}:reg:index"


def pins_key(prefix: str) -> str:
    """The hash of segment hash -> pin JSON over every pinned segment: what keeps a pinned version from
    being pruned (written before a segment's `pin`, removed after it)."""
    return f"{prefix}:reg:pins"


def pins_changed_key(prefix: str) -> str:
    """A counter every pin and unpin increments: what a worker polls to republish at once."""
    return f"{prefix}:reg:pins-changed"


def shared_registry_prefix(prefix: str) -> str:
    """The shared model's registry lives under its own prefix, out of reach of any segment's keys."""
    return f"{prefix}:shared"


def shared_seen_key(prefix: str, topic: str) -> str:
    """The hash of `<partition>:<segment hash>` -> the last sequence number the group's shared trainer
    took as new: what it has trained on survives a restart and a change of trainer."""
    return f"{prefix}:{{{topic}-shared}}:seen"


def shared_counted_key(prefix: str, topic: str) -> str:
    """The hash of partition -> its `events` counter (`PartitionPart` `stats`) when the last shared run
    pooled: what arrived since is the group's new events, read per partition, never per segment."""
    return f"{prefix}:{{{topic}-shared}}:counted"


def shared_lock_key(prefix: str, topic: str) -> str:
    """The lock a shared run holds while it pools, trains and records (`worker.state.lock`): one shared
    run per group at a time. Tagged like `shared_seen_key`, so one script may fence both."""
    return f"{prefix}:{{{topic}-shared}}:lock"


def dlq_redrive_tag(prefix: str, dlq_topic: str) -> str:
    """`P:{<dlq topic>-redrive}`: the re-drive progress of one DLQ; its keys share one slot."""
    return f"{prefix}:{{{dlq_topic}-redrive}}"


def dlq_redrive_next_key(prefix: str, dlq_topic: str) -> str:
    """The hash of DLQ partition -> the DLQ offset below which every record is re-driven or skipped."""
    return f"{dlq_redrive_tag(prefix, dlq_topic)}:next"


def dlq_redrive_done_key(prefix: str, dlq_topic: str, partition: int) -> str:
    """The sorted set of DLQ offsets at or above `next` that a filtered re-drive already handled."""
    return f"{dlq_redrive_tag(prefix, dlq_topic)}:done:{partition}"


def dlq_redrive_lock_key(prefix: str, dlq_topic: str) -> str:
    """The lock one re-drive of a DLQ holds while it runs (`worker.state.lock`)."""
    return f"{dlq_redrive_tag(prefix, dlq_topic)}:lock"
