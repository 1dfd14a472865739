"""The `/metrics`, `/healthz` and `/readyz` server.

The standard library's request handler behind a small selector loop in daemon threads: a scrape or a probe
never touches the poll loop or the compute thread. It binds to `WORKER_METRICS_HOST` (127.0.0.1 unless told
otherwise); Kubernetes binds it on all interfaces, so hostile clients are bounded too: every connection is
closed after `WORKER_METRICS_REQUEST_TIMEOUT_S`, at most `WORKER_METRICS_MAX_CONNECTIONS` are open, and
idle ones hold no thread (see `_Server`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, cast

import structlog
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from worker.config import Settings
from worker.ops.metrics import Metrics

log = structlog.get_logger(__name__)


class Readiness:
    """Named checks for `/readyz`, each cached for `ttl_s` so a probe storm cannot hammer Redis or Kafka.

    A check that raises counts as not ready (during start-up the attributes it reads may not exist yet).
    """

    def __init__(self, checks: Mapping[str, Callable[[], bool]], ttl_s: float = 5.0) -> None:
        self.checks = dict(checks)
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bool]] = {}

    def __call__(self) -> dict[str, bool]:
        now = time.monotonic()
        out: dict[str, bool] = {}
        with self._lock:
            for name, check in self.checks.items():
                cached = self._cache.get(name)
                if cached is not None and now - cached[0] < self.ttl_s:
                    out[name] = cached[1]
                    continue
                try:
                    ok = bool(check())
                except Exception:
                    ok = False
                self._cache[name] = (now, ok)
                out[name] = ok
        return out


class _Handler(BaseHTTPRequestHandler):
    """Answers one request whose head the server has already read (`head`): the handler never waits on a
    slow client's request, and its writes time out after `metrics_request_timeout_s`."""

    server: _Server  # type: ignore[assignment]

    def __init__(self, request: socket.socket, client_address: Any, server: _Server, head: bytes) -> None:
        self.head = head
        super().__init__(request, client_address, server)  # type: ignore[arg-type]

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BytesIO(self.head)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.render(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            try:
                checks = self.server.ready()
            except Exception as exc:
                body = {"ready": False, "missing": [], "error": str(exc)[:300]}
                self._send(503, json.dumps(body).encode(), "application/json")
                return
            missing = sorted(name for name, ok in checks.items() if not ok)
            body = {"ready": not missing, "missing": missing, "checks": checks}
            self._send(200 if not missing else 503, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes arrive every few seconds: keep them out of the worker's log."""


MAX_HEAD_BYTES = 16_384
"""A longer request head (line and headers) is no probe or scrape: its connection is dropped."""

_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass
class _Reading:
    """A connection whose request head has not fully arrived."""

    address: Any
    deadline: float
    head: bytearray


class _Server:
    """One selector thread accepts connections and reads request heads; each complete request is answered
    in a thread of its own. An idle or slow client thus holds a file descriptor, never a thread, and
    never delays a probe.

    Every connection has `timeout_s` from its accept to be answered, then it is closed. At most
    `max_connections` are open: a new one beyond makes room by dropping the oldest that is still sending
    its request (a flood of idle sockets cannot lock a probe out), or, when all are being answered, it is
    answered 503 and closed at once.
    """

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        ready: Callable[[], dict[str, bool]],
        timeout_s: float,
        max_connections: int,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(socket.SOMAXCONN)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._reading: dict[socket.socket, _Reading] = {}  # in accept order: the oldest first
        self._answering: dict[socket.socket, float] = {}  # the deadline of each; shared with handler threads
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = -math.inf

    def serve_forever(self) -> None:
        self._selector.register(self.socket, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in self._selector.select(timeout=self._next_wait()):
                    if key.fileobj is self.socket:
                        self._accept()
                    elif key.fileobj is not self._wake_r:
                        self._read(cast(socket.socket, key.fileobj))
                self._expire()
        finally:
            for conn in list(self._reading):
                self._drop(conn)
            self._selector.close()

    def shutdown(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def server_close(self) -> None:
        for sock in (self.socket, self._wake_r, self._wake_w):
            sock.close()

    def _next_wait(self) -> float:
        """Until the oldest reading connection's deadline; the answering ones' are checked once a second."""
        first = next(iter(self._reading.values()), None)
        return 1.0 if first is None else min(1.0, max(0.0, first.deadline - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                conn, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._out_of_descriptors(exc)
                return
            conn.setblocking(False)
            with self._lock:
                full = len(self._reading) + len(self._answering) >= self.max_connections
            if full and self._reading:
                self._drop(next(iter(self._reading)))
            elif full:
                with contextlib.suppress(OSError):
                    conn.send(_BUSY)
                conn.close()
                continue
            self._reading[conn] = _Reading(address, time.monotonic() + self.timeout_s, bytearray())
            self._selector.register(conn, selectors.EVENT_READ)

    def _out_of_descriptors(self, exc: OSError) -> None:
        """accept() failed (EMFILE and the like) while the backlog still waits: free a descriptor, or pause,
        rather than spin on a listening socket that stays readable; warn once a minute at most."""
        if self._reading:
            self._drop(next(iter(self._reading)))
        else:
            self._stop.wait(0.1)
        now = time.monotonic()
        if now - self._warned >= 60:
            self._warned = now
            log.warning("metrics endpoint cannot accept", error=str(exc))

    def _read(self, conn: socket.socket) -> None:
        reading = self._reading[conn]
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        reading.head += data
        if not data or len(reading.head) > MAX_HEAD_BYTES:
            self._drop(conn)
        elif b"\r\n\r\n" in reading.head or b"\n\n" in reading.head:
            self._selector.unregister(conn)
            del self._reading[conn]
            with self._lock:
                self._answering[conn] = reading.deadline
            thread = threading.Thread(
                target=self._answer, args=(conn, reading), name="metrics-http-request", daemon=True
            )
            thread.start()

    def _answer(self, conn: socket.socket, reading: _Reading) -> None:
        try:
            conn.settimeout(self.timeout_s)
            _Handler(conn, reading.address, self, bytes(reading.head))
        except Exception:
            log.debug("metrics request failed", exc_info=True)
        finally:
            with self._lock:
                del self._answering[conn]
            conn.close()

    def _expire(self) -> None:
        now = time.monotonic()
        while self._reading:
            conn, reading = next(iter(self._reading.items()))
            if reading.deadline > now:
                break
            self._drop(conn)
        with self._lock:
            for conn, deadline in self._answering.items():
                if deadline <= now:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._reading[conn]
        conn.close()


@dataclass
class MetricsServer:
    """A running endpoint; `close()` stops it (idempotent)."""

    metrics: Metrics
    host: str
    port: int
    _server: _Server
    _thread: threading.Thread

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def start(
    settings: Settings,
    ready: Callable[[], dict[str, bool]],
    metrics: Metrics | None = None,
) -> MetricsServer:
    """Serve `/metrics`, `/healthz` and `/readyz` on `settings.metrics_host:metrics_port` (port 0: any
    free port, see `.port`). Raises OSError naming the settings when the address cannot be bound.

    Logs "metrics endpoint" with the bound host and port: with port 0 only this knows where it listens.
    """
    m = metrics if metrics is not None else Metrics()
    m.watch_readiness(ready)
    host, port = settings.metrics_host, settings.metrics_port
    try:
        server = _Server(
            (host, port), m, ready, settings.metrics_request_timeout_s, settings.metrics_max_connections
        )
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve metrics on WORKER_METRICS_HOST={host} WORKER_METRICS_PORT={port}: {exc}"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    bound = int(server.server_address[1])
    log.info("metrics endpoint", host=host, port=bound)
    return MetricsServer(m, host, bound, server, thread)
