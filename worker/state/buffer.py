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

Every key is built by `worker.state.keys`. The write script gets the five partition keys in KEYS and
each segment's key base in its one packed argument, with that segment's events (one string carries the
reply: per-argument and per-element costs in redis-py were most of the Python time). The segment keys
share the partition's hash tag, so on Redis Cluster they are in the script's slot, though not declared.
The scripts live next to this module (`buffer_write.lua`, `buffer_mark_trained.lua`); entries are
encoded by `worker.state.entry`.

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

import orjson
import redis
from redis.cluster import RedisCluster

from worker.config import Settings
from worker.events import ClickEvent
from worker.state import client as clients
from worker.state import keys
from worker.state.client import RedisClient
from worker.state.entry import decode_entry, encode_entry
from worker.state.keys import PartitionPart, SegmentPart, segment_hash
from worker.state.scripts import lua

# `#!lua`: a script that declares itself is refused whole, before it runs, when Redis is over `maxmemory`
# (one without grows Redis past the limit under `noeviction`).
_WRITE_LUA = "#!lua\n" + lua("entry.lua", "buffer_write.lua")
_MARK_TRAINED_LUA = lua("entry.lua", "buffer_mark_trained.lua")
_MARK_SHARED_SEEN_LUA = lua("buffer_mark_shared_seen.lua")
# No `#!lua`: expiry only frees memory, so it must run even when Redis is over `maxmemory`.
_EXPIRE_LUA = lua("buffer_expire.lua")

_SEP = b"\xff"

_HASH_CACHE_MAX = 100_000


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


class Snapshot(NamedTuple):
    """New events (sequence numbers seq_from..seq_to) and the older sampled events before them."""

    new_events: list[ClickEvent]
    sample_events: list[ClickEvent]
    seq_from: int
    seq_to: int


class Candidate(NamedTuple):
    query: str | None
    item_id: str
    item_text: str


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


class Buffer:
    """The consumer's Redis state. Safe to share between threads: redis-py pools connections."""

    def __init__(
        self, settings: Settings, client: RedisClient | None = None, topic: str | None = None
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.input_topic
        self.prefix = settings.redis_prefix
        self.redis: RedisClient = client or clients.from_settings(settings, socket_timeout=30)
        # The script's SHA1 is known without asking Redis, so building a buffer does no I/O: the first
        # write that finds the script missing loads it (see `InflightWrite.wait`).
        self._write_sha = hashlib.sha1(_WRITE_LUA.encode()).hexdigest()
        self._mark = clients.register_script(self.redis, _MARK_TRAINED_LUA)
        self._mark_seen = clients.register_script(self.redis, _MARK_SHARED_SEEN_LUA)
        self._expire = clients.register_script(self.redis, _EXPIRE_LUA)
        self._hashes: dict[str, str] = {}

    # Keys

    def _tag(self, partition: int, topic: str | None = None) -> str:
        return keys.partition_tag(self.prefix, topic or self.topic, partition)

    def _hash(self, segment: str) -> str:
        h = self._hashes.get(segment)
        if h is None:
            if len(self._hashes) >= _HASH_CACHE_MAX:
                self._hashes.clear()
            h = self._hashes[segment] = segment_hash(segment)
        return h

    def partition_key(self, partition: int, part: PartitionPart, topic: str | None = None) -> str:
        return keys.partition_key(self._tag(partition, topic), part)

    def segment_key(self, partition: int, segment: str, part: SegmentPart, topic: str | None = None) -> str:
        return keys.segment_key(self._tag(partition, topic), self._hash(segment), part)

    # Writes

    def _script_call(self, w: PartitionWrite, now_ms: int) -> _Call:
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

    def _targets(self, calls: list[_Call]) -> list[tuple[redis.Redis[Any], list[int]]]:
        """Which connection pool gets which calls: one Redis gets all; on a cluster, each call goes to the
        master of its partition's slot (all its keys share that slot)."""
        if not isinstance(self.redis, RedisCluster):
            return [(self.redis, list(range(len(calls))))]
        groups: dict[str, tuple[redis.Redis[Any], list[int]]] = {}
        for i, (call_keys, _, _) in enumerate(calls):
            node = self.redis.get_node_from_key(call_keys[0])
            if node is None:
                raise redis.exceptions.ClusterError(f"no master holds the slot of {call_keys[0]}")
            group = groups.get(node.name)
            if group is None:
                group = groups[node.name] = (self.redis.get_redis_connection(node), [])
            group[1].append(i)
        return list(groups.values())

    def _send_calls(self, calls: list[_Call]) -> list[_Sent]:
        sent: list[_Sent] = []
        try:
            for target, indices in self._targets(calls):
                pool = target.connection_pool
                conn = pool.get_connection()
                sent.append((pool, conn, indices))
                packed = b"".join(
                    _resp(["EVALSHA", self._write_sha, len(calls[i][0]), *calls[i][0], *calls[i][1]])
                    for i in indices
                )
                conn.send_packed_command([packed])
        except BaseException:
            for pool, conn, _ in sent:  # replies that are never read would poison the connection
                conn.disconnect()
                pool.release(conn)
            raise
        return sent

    def _read_replies(self, sent: list[_Sent], n: int) -> list[Any]:
        replies: list[Any] = [None] * n
        failure: BaseException | None = None
        for pool, conn, indices in sent:
            try:
                for i in indices:
                    try:
                        replies[i] = conn.read_response()
                    except redis.exceptions.ResponseError as exc:
                        replies[i] = exc
            except BaseException as exc:
                conn.disconnect()
                failure = failure or exc
            finally:
                pool.release(conn)
        if failure is not None:
            raise failure
        return replies

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

    # Reads

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

    def training_snapshot(self, partition: int, segment: str) -> Snapshot:
        """The new events and the older sample, read in one transaction so the ranges agree."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(self.segment_key(partition, segment, "meta"), "seq")
        pipe.lrange(self.segment_key(partition, segment, "new"), 0, -1)
        pipe.lrange(self.segment_key(partition, segment, "sample"), 0, -1)
        seq_raw, new_raw, sample_raw = pipe.execute()
        seq = int(seq_raw or 0)
        older = sample_raw[: max(0, len(sample_raw) - len(new_raw))]
        return Snapshot(_events(new_raw), _events(older), seq - len(new_raw) + 1, seq)

    def recent(self, partition: int, segment: str, n: int) -> tuple[list[ClickEvent], int]:
        """The segment's last `n` events (older sampled ones, then new ones, as `training_snapshot` orders
        them) and the sequence number of the last, read in one transaction: only `n` are read and parsed,
        whatever the lists hold."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(self.segment_key(partition, segment, "meta"), "seq")
        pipe.llen(self.segment_key(partition, segment, "new"))
        pipe.lrange(self.segment_key(partition, segment, "new"), -n, -1)
        pipe.lrange(self.segment_key(partition, segment, "sample"), -n, -1)
        seq_raw, new_len, new_raw, sample_raw = pipe.execute()
        older = sample_raw[: max(0, len(sample_raw) - new_len)]
        raw = new_raw if new_len >= n else [*older, *new_raw][-n:]
        return _events(raw), int(seq_raw or 0)

    def events_counters(self, partitions: Iterable[int]) -> dict[int, int]:
        """Each partition's `events` counter: every event ever buffered there (one read per partition)."""
        parts = list(partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hget(self.partition_key(p, "stats"), "events")
        return {p: int(raw or 0) for p, raw in zip(parts, pipe.execute(), strict=True)}

    def shared_counted(self) -> dict[int, int]:
        """partition -> its `events` counter when the group's last shared run pooled."""
        raw = self.redis.hgetall(keys.shared_counted_key(self.prefix, self.topic))
        return {int(k): int(v) for k, v in raw.items()}

    def mark_shared_counted(self, counters: dict[int, int]) -> int:
        """Move the counters a shared run took forward (never back), atomically; returns how many moved."""
        if not counters:
            return 0
        args: list[Any] = []
        for p, n in counters.items():
            args += (str(p), n)
        return int(self._mark_seen(keys=[keys.shared_counted_key(self.prefix, self.topic)], args=args))

    def candidates(self, partition: int, segment: str) -> list[Candidate]:
        """Distinct recent query/item pairs of a segment, most recently seen first."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrevrange(self.segment_key(partition, segment, "candz"), 0, -1)
        pipe.hgetall(self.segment_key(partition, segment, "cand"))
        order, payloads = pipe.execute()
        out = []
        for field in order:
            raw = payloads.get(field)
            if raw is not None:
                doc = orjson.loads(decode_entry(raw)[1])
                out.append(Candidate(doc.get("query"), doc["item_id"], doc["item_text"]))
        return out

    def shared_seen(self) -> dict[tuple[int, str], int]:
        """(partition, segment hash) -> the last sequence number a shared run took as new."""
        raw = self.redis.hgetall(keys.shared_seen_key(self.prefix, self.topic))
        out: dict[tuple[int, str], int] = {}
        for field_, value in raw.items():
            partition, _, seg_hash = field_.decode().partition(":")
            out[(int(partition), seg_hash)] = int(value)
        return out

    def mark_shared_seen(self, seen: dict[tuple[int, str], int]) -> int:
        """Move the group's shared-seen marks forward (never back), atomically; returns how many moved."""
        if not seen:
            return 0
        args: list[Any] = []
        for (p, h), seq in seen.items():
            args += (f"{p}:{h}", seq)
        return int(self._mark_seen(keys=[keys.shared_seen_key(self.prefix, self.topic)], args=args))

    def segment_hash(self, segment: str) -> str:
        return self._hash(segment)

    def scores_shared_version(self, partition: int) -> int:
        """The shared version the partition's scores were last refreshed for (0: never)."""
        raw = self.redis.hget(self.partition_key(partition, "served"), "shared")
        return int(raw) if raw else 0

    def mark_scores_shared_version(self, partition: int, version: int) -> None:
        self.redis.hset(self.partition_key(partition, "served"), "shared", version)

    def mark_trained(
        self, partition: int, segment: str, seq_to: int, now_ms: int | None = None, epoch: int | None = None
    ) -> int:
        """Drop new events up to `seq_to` (later arrivals stay new), start the cooldown; returns how many.

        With the owner `epoch` the training started under: -1, and nothing changed, when the partition
        has had a newer owner since (the new owner's events are not trimmed by a revoked training)."""
        meta = self.segment_key(partition, segment, "meta")
        new = self.segment_key(partition, segment, "new")
        offsets = self.partition_key(partition, "offsets")
        stamp = int(time.time() * 1000) if now_ms is None else now_ms
        fence = "" if epoch is None else epoch
        return int(self._mark(keys=[meta, new, offsets], args=[seq_to, stamp, fence]))

    def expire_idle(
        self, partition: int, older_than_ms: int, limit: int = 100, epoch: int | None = None
    ) -> list[str]:
        """Delete up to `limit` segments whose last event is older than `older_than_ms`, with all their
        keys, and their shared-seen marks; returns their names. Offsets, dedup and stats stay. With the
        owner `epoch`: nothing, when the partition has had a newer owner since.

        The script checks the time again, so a segment that got an event since it was picked stays.
        The mark lives in another slot and goes after the script: a crash in between, or a shared run
        that marks the segment meanwhile, leaves an old mark that hides the returning segment's events
        from shared runs as new until its sequence number passes that mark."""
        active = self.partition_key(partition, "active")
        picked = self.redis.zrangebyscore(active, "-inf", f"({older_than_ms}", start=0, num=limit)
        if not picked:
            return []
        tag = self._tag(partition)
        args: list[Any] = [older_than_ms, "" if epoch is None else epoch]
        for h in picked:
            args += (h, keys.segment_key_base(tag, h.decode()))
        script_keys = [self.partition_key(partition, part) for part in ("segs", "active", "offsets")]
        reply = self._expire(keys=script_keys, args=args)
        gone = [(reply[i].decode(), reply[i + 1]) for i in range(0, len(reply), 2)]
        if gone:
            fields = [f"{partition}:{h}" for h, _ in gone]
            self.redis.hdel(keys.shared_seen_key(self.prefix, self.topic), *fields)
        return [name.decode("utf-8", "surrogatepass") for _, name in gone if name]

    def purge(self) -> int:
        """Delete every key under this prefix (tests, demos); returns how many."""
        removed = 0
        batch: list[bytes] = []
        for key in self.redis.scan_iter(match=keys.prefix_pattern(self.prefix), count=1000):
            batch.append(key)
            if len(batch) >= 500:
                removed += int(self.redis.unlink(*batch))
                batch = []
        if batch:
            removed += int(self.redis.unlink(*batch))
        return removed


_Call = tuple[list[str], list[Any], list[str]]
_Sent = tuple[Any, Any, list[int]]
"""A connection pool, a connection holding unread replies, and the indices of the calls sent on it."""


def _resp(parts: list[Any]) -> bytes:
    """One command in RESP (bytes, str and int arguments): cheaper than redis-py's packer for big blobs."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if type(p) is bytes else str(p).encode()
        out += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(out)


class InflightWrite:
    """A `Buffer.send` whose replies have not been read yet."""

    def __init__(self, buffer: Buffer, writes: list[PartitionWrite], calls: list[_Call]) -> None:
        self._buffer = buffer
        self._writes = writes
        self._calls = calls
        self._result: WriteResult | None = None
        self._sent = buffer._send_calls(calls) if calls else None

    def wait(self) -> WriteResult:
        """Block until Redis has applied every script of the write; idempotent."""
        if self._result is not None:
            return self._result
        b, calls = self._buffer, self._calls
        replies: list[Any] = []
        if self._sent is not None:
            sent, self._sent = self._sent, None
            replies = b._read_replies(sent, len(calls))
        if any(isinstance(r, redis.exceptions.MovedError) for r in replies) and isinstance(
            b.redis, RedisCluster
        ):
            # A slot moved to another master (resharding, failover): learn the new layout and run again.
            b.redis.nodes_manager.initialize()
            replies = b._read_replies(b._send_calls(calls), len(calls))
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            # Redis lost the script (restart, SCRIPT FLUSH, a new master): load it and run again; scripts
            # that did run skip their now-stored offsets, so nothing is applied twice.
            b._write_sha = clients.script_load(b.redis, _WRITE_LUA)
            replies = b._read_replies(b._send_calls(calls), len(calls))
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


def _events(raw: Sequence[bytes]) -> list[ClickEvent]:
    return [ClickEvent.model_validate_json(decode_entry(item)[1]) for item in raw]
