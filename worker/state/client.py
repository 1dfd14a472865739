"""Redis clients from settings: one Redis, or a Redis Cluster (`redis+cluster://` URLs, redis-py's cluster
client).

The key layout (`worker.state.keys`) puts what one script or transaction touches in one hash slot, so the
state modules work on either: scripts get keys of one slot, multi-key commands stay in one slot, and
pipelines without a transaction may span slots (the cluster client splits them per node).
"""

from __future__ import annotations

from typing import Any, TypeAlias, cast

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.exceptions import RedisClusterException

from worker.config import Settings, redis_cluster_nodes

RedisClient: TypeAlias = "redis.Redis[bytes] | RedisCluster[bytes]"
"""What the state modules talk to: the commands they use exist on both with the same meaning."""


def connect(url: str, **kwargs: Any) -> RedisClient:
    """A client for `url` (a `WORKER_REDIS_URL` value); `kwargs` go to redis-py (timeouts)."""
    nodes = redis_cluster_nodes(url)
    if nodes is None:
        return redis.Redis.from_url(url, **kwargs)
    scheme, rest = url.split("://", 1)
    auth = rest.rpartition("@")[0]
    first_host, first_port = nodes[0]
    plain = f"{'rediss' if scheme.startswith('rediss') else 'redis'}://"
    plain += f"{auth}@" if auth else ""
    plain += f"[{first_host}]:{first_port}" if ":" in first_host else f"{first_host}:{first_port}"
    startup = [ClusterNode(host, port) for host, port in nodes]
    try:
        return RedisCluster.from_url(plain, startup_nodes=startup, **kwargs)
    except RedisClusterException as exc:
        # The cluster client asks a seed for the slot layout at once, and its error is no RedisError:
        # make it one, so callers handle an unreachable cluster as they handle an unreachable Redis.
        raise redis.ConnectionError(f"Redis Cluster at WORKER_REDIS_URL is not usable: {exc}") from exc


def from_settings(settings: Settings, **kwargs: Any) -> RedisClient:
    return connect(settings.redis_url, **kwargs)


def register_script(client: RedisClient, source: str) -> Script:
    """`client.register_script`: redis-py has it on both clients; the types-redis stubs leave the script
    commands out of `RedisCluster`, hence the cast."""
    return cast("redis.Redis[bytes]", client).register_script(source)


def script_load(client: RedisClient, source: str) -> str:
    """SCRIPT LOAD, on every master of a cluster; returns the SHA1 (see `register_script` for the cast)."""
    return str(cast("redis.Redis[bytes]", client).script_load(source))  # type: ignore[no-untyped-call]


def master_key_counts(client: RedisClient, pattern: str) -> dict[str, int]:
    """Keys matching `pattern` per master (`host:port`); one entry for a single Redis. Operators and the
    cluster tests read it to see how the layout spreads over the masters."""
    if not isinstance(client, RedisCluster):
        return {"single": sum(1 for _ in client.scan_iter(match=pattern, count=1000))}
    counts: dict[str, int] = {}
    for node in client.get_primaries():
        conn = client.get_redis_connection(node)
        counts[node.name] = sum(1 for _ in conn.scan_iter(match=pattern, count=1000))
    return counts
