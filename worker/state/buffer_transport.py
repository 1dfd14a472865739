"""Many write scripts in one round trip per Redis master: packed EVALSHA calls and their replies.

redis-py's pipeline packs and parses each argument on its own; a consume batch's scripts carry one big
blob each, so they are packed here (`resp`) and written to each master's connection at once.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from worker.state.client import RedisClient

Call = tuple[list[str], list[Any], list[str]]
"""One script call: its keys, its arguments, and the segment names its reply refers to by index."""
Sent = tuple[Any, Any, list[int]]
"""A connection pool, a connection holding unread replies, and the indices of the calls sent on it."""


def resp(parts: list[Any]) -> bytes:
    """One command in RESP (bytes, str and int arguments): cheaper than redis-py's packer for big blobs."""
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if type(p) is bytes else str(p).encode()
        out += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(out)


def targets(client: RedisClient, calls: list[Call]) -> list[tuple[redis.Redis[Any], list[int]]]:
    """Which connection pool gets which calls: one Redis gets all; on a cluster, each call goes to the
    master of its partition's slot (all its keys share that slot)."""
    if not isinstance(client, RedisCluster):
        return [(client, list(range(len(calls))))]
    groups: dict[str, tuple[redis.Redis[Any], list[int]]] = {}
    for i, (call_keys, _, _) in enumerate(calls):
        node = client.get_node_from_key(call_keys[0])
        if node is None:
            raise redis.exceptions.ClusterError(f"no master holds the slot of {call_keys[0]}")
        group = groups.get(node.name)
        if group is None:
            group = groups[node.name] = (client.get_redis_connection(node), [])
        group[1].append(i)
    return list(groups.values())


def send_calls(client: RedisClient, sha: str, calls: list[Call]) -> list[Sent]:
    """Send every call (EVALSHA of `sha`) without reading a reply; a failure leaves no connection dirty."""
    sent: list[Sent] = []
    try:
        for target, indices in targets(client, calls):
            pool = target.connection_pool
            conn = pool.get_connection()
            sent.append((pool, conn, indices))
            packed = b"".join(
                resp(["EVALSHA", sha, len(calls[i][0]), *calls[i][0], *calls[i][1]]) for i in indices
            )
            conn.send_packed_command([packed])
    except BaseException:
        for pool, conn, _ in sent:  # replies that are never read would poison the connection
            conn.disconnect()
            pool.release(conn)
        raise
    return sent


def read_replies(sent: list[Sent], n: int) -> list[Any]:
    """The replies of `send_calls` in call order (a script error is returned, not raised)."""
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
