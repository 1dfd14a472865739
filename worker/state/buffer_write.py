"""The buffer's write path: one atomic script per partition stores a consume batch and its next offset.

Every key is built by `worker.state.keys`. The write script gets the five partition keys in KEYS and
each segment's key base in its one packed argument, with that segment's events (one string carries the
reply: per-argument and per-element costs in redis-py were most of the Python time). The segment keys
share the partition's hash tag, so on Redis Cluster they are in the script's slot, though not declared.
The script lives next to this module (`buffer_write.lua`); entries are encoded by `worker.state.entry`.

On a Redis Cluster (`redis+cluster://`) the write scripts are grouped by the master that owns each
partition's slot and sent to each master in one packed write, so one consume batch still costs one round
trip per master; every other read is a single-slot transaction or a pipeline the cluster client splits.

The write script also skips any message whose offset is below the stored `next`: a replayed batch
changes nothing, which is what makes results effectively-once on top of at-least-once delivery. Two
checks come first and refuse the whole write: a writer whose owner epoch is older than the stored one is
a zombie ('fenced'); a stored `next` below the offset the writer continues from means Redis lost data
behind it ('rewind': the consumer seeks back, and the events in between are buffered again, not
skipped). An epoch or offset above the stored one is what a Redis that lost data looks like to the
rightful owner, so it is taken, not refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from redis.cluster import RedisCluster

from worker.config import Settings
from worker.state import client as clients
from worker.state import keys
from worker.state.buffer_keys import BufferKeys
from worker.state.buffer_transport import Call, read_replies, send_calls
from worker.state.client import RedisClient
from worker.state.entry import encode_entry
from worker.state.keys import PartitionPart
from worker.state.scripts import lua

# `#!lua`: a script that declares itself is refused whole, before it runs, when Redis is over `maxmemory`
# (one without grows Redis past the limit under `noeviction`).
_WRITE_LUA = "#!lua\n" + lua("entry.lua", "buffer_write.lua")

_SEP = b"\xff"


class Pending(NamedTuple):
    """One valid event on its way into the buffer."""

    offset: int
    segment: str
    event_id: str
    clicked: int
    pair: bytes
    payload: bytes


@dataclass(frozen=True)
class PartitionWrite:
    """Everything one consume batch brings for one partition: valid events, dead letters, the next offset."""

    topic: str
    partition: int
    next_offset: int
    events: Sequence[Pending] = ()
    dead: Sequence[tuple[int, str]] = ()
    epoch: int | None = None
    """The writer's owner epoch (`Buffer.acquire`): a newer one in Redis refuses it. None: unchecked."""
    expected: int | None = None
    """The stored next offset the writer continues from (-1: none); a lower one in Redis means Redis lost
    data behind the writer, and the write is refused so that the writer rewinds. None: unchecked."""


class SegmentState(NamedTuple):
    """What the trigger needs after a write, for each segment that got new events."""

    partition: int
    segment: str
    seq: int
    new: int
    new_pos: int
    new_neg: int
    last_trained_ms: int


@dataclass(frozen=True)
class WriteResult:
    added: int
    duplicates: int
    stale: int
    dead: int
    segments: list[SegmentState]
    fenced: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)
    """(topic, partition) -> the newer owner epoch that refused the write: another consumer owns it now."""
    rewound: dict[tuple[str, int], int | None] = dataclasses.field(default_factory=dict)
    """(topic, partition) -> the stored next offset (None: nothing stored) to consume again from: Redis
    was behind the writer, and nothing of the write was applied."""


class BufferWrites(BufferKeys):
    """Stores consume batches and hands out partition ownership (owner epochs)."""

    def __init__(
        self, settings: Settings, client: RedisClient | None = None, topic: str | None = None
    ) -> None:
        super().__init__(settings, client, topic)
        # The script's SHA1 is known without asking Redis, so building a buffer does no I/O: the first
        # write that finds the script missing loads it (see `InflightWrite.wait`).
        self._write_sha = hashlib.sha1(_WRITE_LUA.encode()).hexdigest()

    def _script_call(self, w: PartitionWrite, now_ms: int) -> Call:
        s = self.settings
        tag = self._tag(w.partition, w.topic)
        groups: dict[str, list[bytes]] = {}
        for e in w.events:
            group = groups.get(e.segment)
            if group is None:
                group = groups[e.segment] = []
            group += (
                b"%d" % e.offset,
                e.event_id.encode(),
                encode_entry(e.clicked, e.payload),
                e.pair,
            )
        blob: list[bytes] = []
        for name, group in groups.items():
            h = self._hash(name)
            blob += (
                h.encode(),
                keys.segment_key_base(tag, h).encode(),
                name.encode("utf-8", "surrogatepass"),
                b"%d" % (len(group) // 4),
            )
            blob += group
        args: list[Any] = [
            now_ms,
            now_ms - s.dedup_ttl_s * 1000,
            s.dedup_max_ids,
            s.new_events_cap,
            s.sample_cap,
            s.candidates_cap,
            w.next_offset,
            len(groups),
            len(w.dead),
            min((e.offset for e in w.events), default=w.next_offset),
            _SEP.join(blob),
            "" if w.epoch is None else w.epoch,
            "" if w.expected is None else w.expected,
        ]
        for offset, code in w.dead:
            args += (offset, code)
        parts: tuple[PartitionPart, ...] = ("offsets", "dedup", "stats", "segs", "active")
        return [keys.partition_key(tag, part) for part in parts], args, list(groups)

    def write(self, writes: Sequence[PartitionWrite]) -> WriteResult:
        """Apply each partition's batch atomically (one script per partition, one round trip for all)."""
        return self.send(writes).wait()

    def send(self, writes: Sequence[PartitionWrite]) -> InflightWrite:
        """Send the scripts of `write` without waiting for Redis; `wait()` on the result to finish it.

        The caller can decode its next batch while Redis runs this one. Until `wait()` returns nothing is
        known to be stored; a failed or repeated send is harmless (the scripts skip stored offsets).
        """
        now_ms = int(time.time() * 1000)
        calls = [self._script_call(w, now_ms) for w in writes]
        return InflightWrite(self, list(writes), calls)

    def acquire(
        self, partitions: Iterable[int], topic: str | None = None
    ) -> dict[int, tuple[int, int | None]]:
        """Take ownership of partitions on assignment: a new owner epoch each (a zombie that still writes
        under the old one is refused from now on) and the stored next offset to resume from."""
        parts = list(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hincrby(self.partition_key(p, "offsets", topic), "epoch", 1)
            pipe.hget(self.partition_key(p, "offsets", topic), "next")
        replies = pipe.execute()
        return {
            p: (int(replies[2 * i]), None if replies[2 * i + 1] is None else int(replies[2 * i + 1]))
            for i, p in enumerate(parts)
        }


class InflightWrite:
    """A `Buffer.send` whose replies have not been read yet."""

    def __init__(self, buffer: BufferWrites, writes: list[PartitionWrite], calls: list[Call]) -> None:
        self._buffer = buffer
        self._writes = writes
        self._calls = calls
        self._result: WriteResult | None = None
        self._sent = send_calls(buffer.redis, buffer._write_sha, calls) if calls else None

    def wait(self) -> WriteResult:
        """Block until Redis has applied every script of the write; idempotent."""
        if self._result is not None:
            return self._result
        b, calls = self._buffer, self._calls
        replies: list[Any] = []
        if self._sent is not None:
            sent, self._sent = self._sent, None
            replies = read_replies(sent, len(calls))
        if any(isinstance(r, redis.exceptions.MovedError) for r in replies) and isinstance(
            b.redis, RedisCluster
        ):
            # A slot moved to another master (resharding, failover): learn the new layout and run again.
            b.redis.nodes_manager.initialize()
            replies = read_replies(send_calls(b.redis, b._write_sha, calls), len(calls))
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            # Redis lost the script (restart, SCRIPT FLUSH, a new master): load it and run again; scripts
            # that did run skip their now-stored offsets, so nothing is applied twice.
            b._write_sha = clients.script_load(b.redis, _WRITE_LUA)
            replies = read_replies(send_calls(b.redis, b._write_sha, calls), len(calls))
        for r in replies:
            if isinstance(r, Exception):
                raise r
        added = dups = stale = dead = 0
        states: list[SegmentState] = []
        fenced: dict[tuple[str, int], int] = {}
        rewound: dict[tuple[str, int], int | None] = {}
        for w, (_, _, names), raw in zip(self._writes, calls, replies, strict=True):
            reply = raw.split(b",")
            where = (w.topic, w.partition)
            if reply[0] == b"fenced":
                fenced[where] = int(reply[1])
                continue
            if reply[0] == b"rewind":
                rewound[where] = None if int(reply[1]) < 0 else int(reply[1])
                continue
            added += int(reply[0])
            dups += int(reply[1])
            stale += int(reply[2])
            dead += int(reply[3])
            for j in range(4, len(reply), 6):
                states.append(
                    SegmentState(
                        w.partition,
                        names[int(reply[j]) - 1],
                        int(reply[j + 1]),
                        int(reply[j + 2]),
                        int(reply[j + 3]),
                        int(reply[j + 4]),
                        int(reply[j + 5]),
                    )
                )
        self._result = WriteResult(added, dups, stale, dead, states, fenced, rewound)
        return self._result
