"""`stack up --redis-cluster`: a 3-master Redis Cluster on loopback (no replicas) at the port of a
`redis+cluster://` WORKER_REDIS_URL and the next two."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from worker.config import Settings, redis_cluster_nodes
from worker.tools.stack.endpoints import LOOPBACK, Endpoints, stack_dir
from worker.tools.stack.processes import START_TIMEOUT_S, PidFile, StackError, stop_pid
from worker.tools.stack.redis import node_markers, start_redis_server

CLUSTER_MASTERS = 3


def cluster_root(settings: Settings) -> Path:
    return stack_dir(settings) / "redis-cluster"


def cluster_nodes(settings: Settings) -> list[tuple[str, int]]:
    """The local cluster's masters: the port of WORKER_REDIS_URL and the next two (each also uses its
    port + 10000 for the cluster bus)."""
    nodes = redis_cluster_nodes(settings.redis_url)
    if nodes is None:
        raise StackError(
            "--redis-cluster needs a cluster URL: set WORKER_REDIS_URL=redis+cluster://127.0.0.1:7000 "
            f"(masters on 7000, 7001 and 7002), got {settings.redis_url.split('://', 1)[0]}://..."
        )
    host, port = nodes[0]
    if host not in LOOPBACK:
        raise StackError(f"WORKER_REDIS_URL names {host}: the local stack starts Redis on loopback only")
    if port + CLUSTER_MASTERS - 1 + 10000 > 65535:
        raise StackError(f"WORKER_REDIS_URL port {port} leaves no room for the cluster bus (port + 10000)")
    return [(host, port + i) for i in range(CLUSTER_MASTERS)]


def _cluster_info(host: str, port: int) -> dict[str, str]:
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw = client.execute_command("CLUSTER INFO")
    finally:
        client.close()
    if isinstance(raw, dict):  # redis-py parses CLUSTER INFO into a dict
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def start_redis_cluster(settings: Settings) -> str:
    """Three `redis-server`s in cluster mode (no replicas), joined by `redis-cli --cluster create` on the
    first start; a restart reuses each node's `nodes.conf`. Waits until each node says `cluster_state:ok`."""
    nodes = cluster_nodes(settings)
    root = cluster_root(settings)
    started = []
    for host, port in nodes:
        what = start_redis_server(
            root / str(port),
            host,
            port,
            ["cluster-enabled yes", "cluster-config-file nodes.conf", "cluster-node-timeout 5000"],
            bus=True,
        )
        started.append(what)
    info = _cluster_info(*nodes[0])
    if info.get("cluster_slots_assigned") == "0" and info.get("cluster_known_nodes") == "1":
        cli = shutil.which("redis-cli")
        if cli is None:
            raise StackError("`redis-cli` not found on PATH: it comes with `apt-get install -y redis-server`")
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"{h}:{p}" for h, p in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            raise StackError(
                f"redis-cli --cluster create failed:\n{create.stdout[-2000:]}{create.stderr[-2000:]}"
            )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        infos = [_cluster_info(h, p) for h, p in nodes]
        if all(
            i.get("cluster_state") == "ok" and i.get("cluster_known_nodes") == str(len(nodes)) for i in infos
        ):
            ports = ",".join(str(p) for _, p in nodes)
            return f"{len(nodes)} masters on {nodes[0][0]}:{ports}, cluster_state ok ({'; '.join(started)})"
        time.sleep(0.2)
    raise StackError(f"the Redis Cluster did not reach cluster_state:ok within {START_TIMEOUT_S:.0f} s")


def cluster_pidfiles(settings: Settings) -> list[PidFile]:
    """Each started cluster node's pid file and markers, from the directories `up` created."""
    root = cluster_root(settings)
    if not root.is_dir():
        return []
    host = Endpoints.from_settings(settings).redis_host
    return [
        (node / "redis.pid", node_markers(node, host, int(node.name)))
        for node in sorted(root.iterdir())
        if node.name.isdigit()
    ]


def stop_redis_cluster(settings: Settings) -> str:
    stopped = [stop_pid(pidfile, markers) for pidfile, markers in cluster_pidfiles(settings)]
    return "; ".join(stopped) if stopped else "not running"
