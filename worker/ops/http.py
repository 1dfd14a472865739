"""The `/metrics`, `/healthz` and `/readyz` server.

The standard library's HTTP server in a daemon thread: a scrape or a probe never touches the poll loop or
the compute thread. It binds to `WORKER_METRICS_HOST` (127.0.0.1 unless told otherwise).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    server: _Server

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: Metrics, ready: Callable[[], dict[str, bool]]
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        super().__init__(address, _Handler)


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
    host, port = settings.metrics_host, settings.metrics_port
    try:
        server = _Server((host, port), m, ready)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve metrics on WORKER_METRICS_HOST={host} WORKER_METRICS_PORT={port}: {exc}"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    bound = int(server.server_address[1])
    log.info("metrics endpoint", host=host, port=bound)
    return MetricsServer(m, host, bound, server, thread)
