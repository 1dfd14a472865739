"""Where a buffer's state is: its settings, its Redis client, and the keys of partitions and segments.

Every concern of the buffer (`buffer_write`, `buffer_training`, `buffer_counts`, `buffer_maintenance`)
builds its keys here, so all of them agree on the layout that `worker.state.keys` defines.
"""

from __future__ import annotations

from worker.config import Settings
from worker.state import client as clients
from worker.state import keys
from worker.state.client import RedisClient
from worker.state.keys import PartitionPart, SegmentPart, segment_hash

_HASH_CACHE_MAX = 100_000


class BufferKeys:
    """The Redis client and key builders the buffer's parts share."""

    def __init__(
        self, settings: Settings, client: RedisClient | None = None, topic: str | None = None
    ) -> None:
        self.settings = settings
        self.topic = topic or settings.input_topic
        self.prefix = settings.redis_prefix
        self.redis: RedisClient = client or clients.from_settings(settings, socket_timeout=30)
        self._hashes: dict[str, str] = {}

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

    def segment_hash(self, segment: str) -> str:
        return self._hash(segment)
