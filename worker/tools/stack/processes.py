"""The stack's own processes: pid files, the markers that tell ours from a recycled pid, free ports,
waiting for a start, stopping, and the last lines of a log for error messages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

START_TIMEOUT_S = 60.0

PidFile = tuple[Path, tuple[str, ...]]
"""A service's pid file and the markers that prove the pid in it is still that service."""


class StackError(RuntimeError):
    """A service of the local stack could not be prepared or started; the message says what to do."""


def pid_alive(pid: int, *markers: str) -> bool:
    """True when `pid` runs and its command line contains one of `markers`, or its working directory is
    one of them: a recycled pid is not ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    if not any(m in cmdline or m == cwd for m in markers):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def running_pid(pidfile: Path, markers: tuple[str, ...]) -> int | None:
    """The pid `pidfile` records when that process is alive and still ours, else None."""
    pid = read_pid(pidfile)
    return pid if pid and pid_alive(pid, *markers) else None


def port_open(host: str, port: int, timeout: float) -> bool:
    """Something accepts TCP connections on `host:port` (a bracketed IPv6 host is fine)."""
    try:
        socket.create_connection((host.strip("[]"), port), timeout=timeout).close()
    except OSError:
        return False
    return True


def ensure_free(host: str, port: int, service: str, setting: str) -> None:
    """Refuse to start on a port something else holds: the new server would fail to bind while the
    other one answered the health probe, and `up` would report a start that did not happen."""
    if port_open(host, port, timeout=1.0):
        raise StackError(
            f"{host}:{port} is already in use by a process this stack did not start, so {service} cannot "
            f"start there: stop it, or set {setting} to a free port"
        )


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_started(
    proc: subprocess.Popen[bytes],
    healthy: Callable[[], bool],
    interval_s: float,
    log: Path,
    exited: Callable[[int], str],
    timed_out: str,
) -> None:
    """Poll `healthy()` until it holds. A server that exits first fails with `exited(code)`, one still
    not healthy after START_TIMEOUT_S with `timed_out`; both followed by the last lines of `log`."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{exited(proc.returncode)}:\n{tail(log)}")
        if healthy():
            return
        time.sleep(interval_s)
    raise StackError(f"{timed_out}:\n{tail(log)}")


def stop_pid(pidfile: Path, markers: tuple[str, ...], *, kill: bool = False, grace_s: float = 30.0) -> str:
    """Stop the process `pidfile` records, after checking it is still ours, and remove the pid file:
    SIGTERM, then SIGKILL after `grace_s`; with `kill`, SIGKILL at once."""
    pid = read_pid(pidfile)
    if pid is None:
        if kill:
            pidfile.unlink(missing_ok=True)
        return "not running"
    if not pid_alive(pid, *markers):
        pidfile.unlink(missing_ok=True)
        return "not running" if kill else "not running (stale pid file removed)"
    if not kill:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and pid_alive(pid, *markers):
            time.sleep(0.2)
    if pid_alive(pid, *markers):
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid, *markers):
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return f"killed (pid {pid})" if kill else f"stopped (pid {pid})"
