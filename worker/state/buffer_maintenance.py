"""Keeping the buffer bounded: idle segments expire, and a whole prefix can be purged."""

from __future__ import annotations

from typing import Any

from worker.config import Settings
from worker.state import client as clients
from worker.state import keys
from worker.state.buffer_keys import BufferKeys
from worker.state.client import RedisClient
from worker.state.scripts import lua

# No `#!lua`: expiry only frees memory, so it must run even when Redis is over `maxmemory`.
_EXPIRE_LUA = lua("buffer_expire.lua")


class BufferMaintenance(BufferKeys):
    """Deletes what the buffer no longer needs."""

    def __init__(
        self, settings: Settings, client: RedisClient | None = None, topic: str | None = None
    ) -> None:
        super().__init__(settings, client, topic)
        self._expire = clients.register_script(self.redis, _EXPIRE_LUA)

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
