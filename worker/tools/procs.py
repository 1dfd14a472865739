"""Real worker processes as the demo, the soak run, the benchmarks and the integration tests start them:
the environment that gives a child exactly the parent's settings, its log file, its metrics port, its stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from worker.config import Settings
from worker.tools.run_settings import settings_env

WORKER_RUN = (sys.executable, "-m", "worker", "run")


def child_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """This process's environment with its `WORKER_*` variables replaced by exactly `settings` plus
    `overrides`, so nothing of the parent's shell (a secrets dir, a stray setting) reaches the child."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    return {**env, **settings_env(settings, **overrides)}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, to hand a child as WORKER_METRICS_PORT: the parent then knows where
    the child's endpoint is without reading its log. Should another process take it first, the child
    exits naming WORKER_METRICS_PORT."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_worker(
    env: Mapping[str, str], log: Path, argv: Sequence[str] = WORKER_RUN, *, stdout_to_log: bool = False
) -> subprocess.Popen[bytes]:
    """`python -m worker run` (or `argv`) with its JSON log lines (stderr) appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=out if stdout_to_log else subprocess.DEVNULL,
            stderr=out,
        )


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float) -> None:
    """Until the child's /healthz answers, that is, its metrics endpoint is serving. Raises with the
    log's tail when the child exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"worker did not start within {timeout_s} s:\n{log.read_text()[-3000:]}")


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """GET `path` from a child's metrics endpoint: status and body (a 503 of /readyz is an answer too)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float) -> None:
    """Until the child's /readyz answers 200 (partitions assigned, Kafka and Redis answer, model loaded).
    Raises with the log's tail when the child exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    body = b""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            status, body = http_get(port, "/readyz", timeout_s=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"worker not ready within {timeout_s} s ({body.decode(errors='replace')[:300]}):\n"
        f"{log.read_text()[-3000:]}"
    )


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = 120) -> int:
    """SIGTERM: the worker drains (stores its offsets, lets a training finish or abandons it after
    WORKER_DRAIN_GRACE_S) and exits; its exit code, or subprocess.TimeoutExpired after `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout_s)


def rss_kib(pid: int | None = None) -> int | None:
    """Resident set size (VmRSS) of `pid`, or of this process, in KiB; None once the process is gone."""
    try:
        status = Path(f"/proc/{pid or 'self'}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None
