"""Where the stack's services listen (from the settings) and where they keep their files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from worker.config import Settings, redis_cluster_nodes

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def first_broker(bootstrap: str) -> tuple[str, int]:
    """Host (brackets stripped) and port of the first address in a Kafka bootstrap list."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Endpoints:
    kafka_host: str
    kafka_port: int
    redis_host: str
    redis_port: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Endpoints:
        khost, kport = first_broker(settings.kafka_bootstrap)
        nodes = redis_cluster_nodes(settings.redis_url)
        if nodes is not None:
            return cls(khost, kport, nodes[0][0], nodes[0][1])
        url = urlparse(settings.redis_url)
        return cls(khost, kport, url.hostname or "127.0.0.1", url.port or 6379)

    @property
    def kafka_local(self) -> bool:
        return self.kafka_host in LOOPBACK

    @property
    def redis_local(self) -> bool:
        return self.redis_host in LOOPBACK


def stack_dir(settings: Settings) -> Path:
    return (settings.cache_dir / "stack").resolve()
