"""The local Redis: one `redis-server` with its config, data and log under the stack directory (the
cluster's nodes start the same way), and the health probe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from worker.config import Settings
from worker.tools.stack.endpoints import Endpoints, stack_dir
from worker.tools.stack.processes import (
    START_TIMEOUT_S,
    PidFile,
    StackError,
    ensure_free,
    pid_alive,
    running_pid,
    wait_started,
)


def node_markers(root: Path, host: str, port: int) -> tuple[str, str, str]:
    """redis-server rewrites its command line to `host:port` once up; before that it shows its config.
    Its working directory is `root` (its `dir`) either way, so `down` finds it under other settings too."""
    return str(root / "redis.conf"), f"{host}:{port}", str(root)


def redis_files(settings: Settings) -> PidFile:
    root = stack_dir(settings) / "redis"
    ep = Endpoints.from_settings(settings)
    return root / "redis.pid", node_markers(root, ep.redis_host, ep.redis_port)


def redis_healthy(url: str, timeout: float = 2.0) -> bool:
    import redis

    from worker.state.client import connect

    try:
        return bool(connect(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


def start_redis(settings: Settings, ep: Endpoints) -> str:
    return start_redis_server(stack_dir(settings) / "redis", ep.redis_host, ep.redis_port, [])


def start_redis_server(root: Path, host: str, port: int, extra: list[str], bus: bool = False) -> str:
    """One `redis-server` with its config, data and log under `root`, in its own session; waits for PING.
    `bus`: a cluster node, which also listens on port + 10000."""
    pidfile = root / "redis.pid"
    conf = root / "redis.conf"
    pid = running_pid(pidfile, node_markers(root, host, port))
    if pid:
        if pid_alive(pid, f"{host}:{port}"):
            return f"already running (pid {pid})"
        raise StackError(
            f"this stack's Redis (pid {pid}) runs with other settings, not on "
            f"{host}:{port}: stop it first with `python -m worker stack down`"
        )
    ensure_free(host, port, "Redis", "WORKER_REDIS_URL")
    if bus:
        ensure_free(host, port + 10000, "the Redis Cluster bus", "WORKER_REDIS_URL")
    server = shutil.which("redis-server")
    if server is None:
        raise StackError(
            "`redis-server` not found on PATH: install it with `sudo apt-get install -y redis-server`"
        )
    root.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "\n".join(
            [
                f"bind {host}",
                f"port {port}",
                f"dir {root}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                "daemonize no",
                "protected-mode yes",
                f"logfile {root / 'redis.log'}",
                *extra,
                "",
            ]
        )
    )
    proc = subprocess.Popen(
        [server, str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    url = f"redis://{host}:{port}/0"
    wait_started(
        proc,
        lambda: redis_healthy(url, timeout=1.0),
        0.2,
        root / "redis.log",
        lambda code: f"redis-server exited with code {code}",
        f"Redis did not answer PING within {START_TIMEOUT_S:.0f} s",
    )
    return f"started (pid {proc.pid})"
