"""What training reads from the buffer (new events, the sample, candidates) and the marks it sets back.

A segment run reads its new events and the sample before them (`training_snapshot`) and then drops the
new events it trained on (`mark_trained`); a shared run pools many segments and records how far it got
(`mark_shared_seen`, `mark_shared_counted`) so that the next one takes only what came since.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import orjson

from worker.config import Settings
from worker.events import ClickEvent
from worker.state import client as clients
from worker.state import keys
from worker.state.buffer_keys import BufferKeys
from worker.state.client import RedisClient
from worker.state.entry import decode_entry
from worker.state.scripts import lua

_MARK_TRAINED_LUA = lua("entry.lua", "buffer_mark_trained.lua")
_MARK_SHARED_SEEN_LUA = lua("buffer_mark_shared_seen.lua")


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


class BufferTraining(BufferKeys):
    """Reads for training and scoring, and the marks that say what has been trained on."""

    def __init__(
        self, settings: Settings, client: RedisClient | None = None, topic: str | None = None
    ) -> None:
        super().__init__(settings, client, topic)
        self._mark = clients.register_script(self.redis, _MARK_TRAINED_LUA)
        self._mark_seen = clients.register_script(self.redis, _MARK_SHARED_SEEN_LUA)

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


def _events(raw: Sequence[bytes]) -> list[ClickEvent]:
    return [ClickEvent.model_validate_json(decode_entry(item)[1]) for item in raw]
