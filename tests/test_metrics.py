"""worker.ops.metrics and worker.ops.http: the endpoints over real HTTP, the counters, the prequential
gauges, the cardinality cap."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.config import Settings
from worker.ops.http import Readiness, start
from worker.ops.lag import consumer_lag
from worker.ops.metrics import METRIC_NAMES, Metrics
from worker.ops.quality import OTHER


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("WORKER_METRICS_HOST", raising=False)
    return Settings(metrics_port=0)


def test_default_bind_is_loopback(settings: Settings) -> None:
    fields = Settings.model_fields
    assert fields["metrics_host"].default == "127.0.0.1"
    assert fields["metrics_port"].default == 9400
    server = start(settings, lambda: {})
    try:
        assert server._server.server_address[0] == "127.0.0.1"
    finally:
        server.close()


def test_endpoints_over_http(settings: Settings) -> None:
    state = {"partitions_assigned": False, "kafka": True, "redis": True, "model_loaded": False}
    server = start(settings, lambda: dict(state))
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert _get(server.port, "/healthz")[0] == 200
        code, ctype, body = _get(server.port, "/readyz")
        assert code == 503 and ctype == "application/json"
        doc = json.loads(body)
        assert doc["ready"] is False and doc["missing"] == ["model_loaded", "partitions_assigned"]
        state.update(partitions_assigned=True, model_loaded=True)
        code, _, body = _get(server.port, "/readyz")
        assert code == 200 and json.loads(body) == {"ready": True, "missing": [], "checks": state}
        code, ctype, body = _get(server.port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        assert "ctr_worker_events_consumed_total" in body
        assert _get(server.port, "/nope")[0] == 404
    finally:
        server.close()
    server.close()  # idempotent


def test_readyz_503_when_callback_raises(settings: Settings) -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    server = start(settings, broken)
    try:
        code, _, body = _get(server.port, "/readyz")
        assert code == 503 and "boom" in json.loads(body)["error"]
    finally:
        server.close()


def test_two_servers_two_registries() -> None:
    a = start(Settings(metrics_port=0), lambda: {})
    b = start(Settings(metrics_port=0), lambda: {})
    try:
        a.metrics.events_consumed.inc(3)
        assert a.port != b.port
        sa, sb = _samples(_get(a.port, "/metrics")[2]), _samples(_get(b.port, "/metrics")[2])
        assert sa[("ctr_worker_events_consumed_total", ())] == 3
        assert sb[("ctr_worker_events_consumed_total", ())] == 0
    finally:
        a.close()
        b.close()


def test_bind_error_names_the_settings(settings: Settings) -> None:
    first = start(settings, lambda: {})
    try:
        with pytest.raises(OSError, match="WORKER_METRICS_PORT"):
            start(Settings(metrics_port=first.port), lambda: {})
    finally:
        first.close()


# ------------------------------------------------------------------ hostile clients


def _closed_by_server(sock: socket.socket) -> bool | None:
    """True when the server has closed `sock` (EOF or reset), None while it is still open (nothing to read).
    A refused connection may get a short 503 first: it is read past."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
            if not data.startswith(b"HTTP/1.0 503"):
                return False
    except BlockingIOError:
        return None
    except (ConnectionResetError, ConnectionAbortedError):
        return True


def _wait_closed(socks: Sequence[socket.socket], at_least: int, within_s: float) -> int:
    """How many of `socks` the server closed, polled until `at_least` of them are or `within_s` passed."""
    deadline = time.monotonic() + within_s
    closed: set[int] = set()
    while True:
        closed |= {i for i, s in enumerate(socks) if i not in closed and _closed_by_server(s)}
        if len(closed) >= at_least or time.monotonic() > deadline:
            return len(closed)
        time.sleep(0.1)


def test_idle_and_partial_connections_neither_block_probes_nor_stay_open() -> None:
    """Slowloris: 200 sockets that send nothing or half a request line hold no probe up, and the server
    drops each of them once `metrics_request_timeout_s` has passed."""
    server = start(Settings(metrics_port=0, metrics_request_timeout_s=5, metrics_max_connections=300), dict)
    socks: list[socket.socket] = []
    try:
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 10 == 0:
                sock.sendall(b"GET /metr")
            socks.append(sock)
        started = time.monotonic()
        assert _get(server.port, "/healthz")[0] == 200
        assert _get(server.port, "/metrics")[0] == 200
        assert _get(server.port, "/readyz")[0] == 200
        assert time.monotonic() - started < 5, "the probes waited for the idle sockets to go"
        assert _wait_closed(socks, len(socks), within_s=20) == len(socks)
        assert _get(server.port, "/healthz")[0] == 200
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_connections_beyond_the_cap_drop_the_oldest_idle_one() -> None:
    """With the cap reached by idle sockets, a probe still gets in: the oldest idle connection makes room."""
    server = start(Settings(metrics_port=0, metrics_request_timeout_s=120, metrics_max_connections=4), dict)
    socks: list[socket.socket] = []
    try:
        for _ in range(20):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        assert _get(server.port, "/healthz")[0] == 200
        assert _get(server.port, "/metrics")[0] == 200
        assert _wait_closed(socks, 16, within_s=10) >= 16
        assert all(_closed_by_server(s) is None for s in socks[-2:]), "the newest idle sockets were dropped"
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_a_connection_beyond_the_cap_is_refused_while_all_are_being_answered() -> None:
    """With every slot answering (a slow readiness check), a new connection is turned away at once."""
    release, entered = threading.Event(), threading.Semaphore(0)

    def slow_ready() -> dict[str, bool]:
        entered.release()
        release.wait(30)
        return {}

    server = start(
        Settings(metrics_port=0, metrics_request_timeout_s=60, metrics_max_connections=2), slow_ready
    )
    busy = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2)]
    try:
        for sock in busy:
            sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
        for _ in busy:
            assert entered.acquire(timeout=10)
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        answer = b""
        try:
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                extra.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                while chunk := extra.recv(4096):
                    answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.0 503"), answer[:100]
        finally:
            extra.close()
        release.set()
        for sock in busy:
            assert sock.makefile("rb").readline().startswith(b"HTTP/1.0 200")
        assert _get(server.port, "/healthz")[0] == 200
    finally:
        release.set()
        for sock in busy:
            sock.close()
        server.close()


def test_every_declared_name_is_exported() -> None:
    m = Metrics()
    m.prequential.record("s", [0.2, 0.8], [0, 1])
    m.sync_ingest(FakeStats(by_code={"schema": 1}))
    m.set_partitions({0: 1}, {0: 1})
    m.watch_readiness(lambda: {"redis": True})
    names = {s.name for fam in m.registry.collect() for s in fam.samples}
    for name in METRIC_NAMES:
        assert name in names or f"{name}_bucket" in names, name
    families = {fam.name for fam in m.registry.collect() if fam.name.startswith("ctr_worker_")}
    assert {n.removesuffix("_total") for n in METRIC_NAMES} == families


def test_ready_gauge_follows_the_readiness_checks() -> None:
    checks = {"redis": True, "kafka": True}
    m = Metrics()
    m.watch_readiness(lambda: dict(checks))
    assert m.registry.get_sample_value("ctr_worker_ready") == 1.0
    checks["kafka"] = False
    assert m.registry.get_sample_value("ctr_worker_ready") == 0.0


@dataclass
class FakeStats:
    consumed: int = 0
    added: int = 0
    duplicates: int = 0
    stale: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


def test_counters_after_increments() -> None:
    m = Metrics()
    stats = FakeStats(consumed=10, added=7, duplicates=2, by_code={"invalid_json": 1})
    m.sync_ingest(stats)
    stats.consumed, stats.by_code["invalid_json"], stats.by_code["oversize"] = 15, 2, 1
    m.sync_ingest(stats)
    started = m.training_started("segment")
    m.training_finished("segment", "promoted", started)
    m.training_finished("shared", "rejected", m.training_started("shared"))
    m.training_finished("segment", "failed")
    m.scores_published.labels(kind="refresh").inc(40)
    m.set_partitions({0: 5, 3: 0}, {0: 12, 3: 1})
    s = _samples(m.render().decode())
    assert s[("ctr_worker_events_consumed_total", ())] == 15
    assert s[("ctr_worker_events_buffered_total", ())] == 7
    assert s[("ctr_worker_events_deduplicated_total", ())] == 2
    assert s[("ctr_worker_events_dead_lettered_total", (("reason", "invalid_json"),))] == 2
    assert s[("ctr_worker_events_dead_lettered_total", (("reason", "oversize"),))] == 1
    assert s[("ctr_worker_trainings_started_total", (("scope", "segment"),))] == 1
    assert s[("ctr_worker_trainings_promoted_total", (("scope", "segment"),))] == 1
    assert s[("ctr_worker_trainings_rejected_total", (("scope", "shared"),))] == 1
    assert s[("ctr_worker_trainings_failed_total", (("scope", "segment"),))] == 1
    assert s[("ctr_worker_training_duration_seconds_count", (("scope", "segment"),))] == 1
    assert s[("ctr_worker_scores_published_total", (("kind", "refresh"),))] == 40
    assert s[("ctr_worker_consumer_lag", (("partition", "0"),))] == 5
    assert s[("ctr_worker_buffer_new_events", (("partition", "0"),))] == 12
    m.set_partitions({3: 2}, {3: 1})  # partition 0 revoked: its series go
    s = _samples(m.render().decode())
    assert ("ctr_worker_consumer_lag", (("partition", "0"),)) not in s
    assert s[("ctr_worker_consumer_lag", (("partition", "3"),))] == 2


def test_dlq_reason_cardinality_capped() -> None:
    m = Metrics()
    m.sync_ingest(FakeStats(by_code={f"code{i}": 1 for i in range(100)}))
    reasons = {
        s.labels["reason"]
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name == "ctr_worker_events_dead_lettered_total"
    }
    assert len(reasons) <= 33 and "other" in reasons


def test_segment_cardinality_cap() -> None:
    m = Metrics(max_segments=5)
    for i in range(40):  # traffic falls with i: the first five are the busiest
        m.prequential.record(f"seg{i}", [0.2, 0.8] * (40 - i), [0, 1] * (40 - i))
    m.prequential.record("seg39", [0.3, 0.7] * 100, [0, 1] * 100)  # now the busiest: takes a label
    labels = {
        s.labels["segment"]
        for fam in m.registry.collect()
        for s in fam.samples
        if s.name.startswith("ctr_worker_online_")
    }
    assert len(labels) == 6 and OTHER in labels
    # the busiest five keep their own label
    assert labels - {OTHER} == {"seg0", "seg1", "seg2", "seg3", "seg39"}


def test_score_before_learning_groups_by_segment() -> None:
    """Per segment, the last `window` events go to the caller's scorer (which computes their history
    folds: `Learner.score_events`, tested in test_learner.py)."""
    m = Metrics(window=3)
    calls: list[tuple[str, int]] = []
    events_seen: list[SimpleNamespace] = []

    def score(segment: str, events: Sequence[SimpleNamespace]) -> tuple[Any, int]:
        calls.append((segment, len(events)))
        assert all(e.segment == segment for e in events)
        events_seen.extend(events)
        return np.linspace(0.1, 0.9, len(events)), 0

    events = [
        SimpleNamespace(event_id=f"e{i}", segment="ab"[i % 2], query="q", item_text="t", clicked=i % 3 == 0)
        for i in range(10)
    ]
    assert m.score_before_learning(score, events) == 6
    assert sorted(calls) == [("a", 3), ("b", 3)]
    scored = [e for e in events if e.segment == "a"][-3:] + [e for e in events if e.segment == "b"][-3:]
    assert sorted(e.event_id for e in events_seen) == sorted(e.event_id for e in scored)
    s = _samples(m.render().decode())
    assert s[("ctr_worker_scoring_duration_seconds_count", (("kind", "prequential"),))] == 2


def test_readiness_caches_and_treats_errors_as_not_ready() -> None:
    calls = {"n": 0}

    def counted() -> bool:
        calls["n"] += 1
        return True

    def broken() -> bool:
        raise AttributeError("not built yet")

    ready = Readiness({"redis": counted, "model_loaded": broken}, ttl_s=60)
    assert ready() == {"redis": True, "model_loaded": False}
    ready()
    assert calls["n"] == 1


@dataclass
class TP:
    topic: str
    partition: int
    offset: int


class FakeConsumer:
    """`high` is the broker's watermark; the cache holds `cached` (default: the same), or nothing."""

    def __init__(
        self,
        positions: dict[int, int],
        high: dict[int, int],
        unfetched: set[int],
        cached: dict[int, int] | None = None,
    ) -> None:
        self.positions, self.high, self.unfetched = positions, high, unfetched
        self.cached = dict(cached or high)
        self.broker_calls: list[int] = []

    def assignment(self) -> list[TP]:
        return [TP("clicks", p, -1001) for p in self.positions]

    def position(self, tps: list[TP]) -> list[TP]:
        return [TP(tp.topic, tp.partition, self.positions[tp.partition]) for tp in tps]

    def get_watermark_offsets(
        self, tp: TP, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        if not cached:
            assert timeout is not None, "a broker call without a timeout could hold the poll loop"
            self.broker_calls.append(tp.partition)
            return 0, self.high[tp.partition]
        return (-1001, -1001) if tp.partition in self.unfetched else (0, self.cached[tp.partition])


class FakeBuffer:
    def stored_offsets(self, partitions: list[int], topic: str) -> dict[int, int | None]:
        return {p: 40 if p == 1 else None for p in partitions}


def test_consumer_lag() -> None:
    consumer = FakeConsumer({0: 90, 1: -1001, 2: -1001}, {0: 100, 1: 50, 2: 7}, unfetched={2})
    assert consumer_lag(consumer, [0, 1, 2], FakeBuffer()) == {0: 10, 1: 10, 2: 7}
    assert consumer.broker_calls == [2], "the broker is asked only for what is not cached"
    assert consumer_lag(consumer, [0]) == {0: 10}
    assert consumer_lag(consumer, [2], fallback_budget_s=0) == {}


def test_consumer_lag_while_paused_asks_the_broker() -> None:
    """Paused partitions are not fetched, so the cached watermark stops while producers go on."""
    consumer = FakeConsumer({0: 90, 1: 40}, {0: 160, 1: 75}, unfetched=set(), cached={0: 100, 1: 50})
    assert consumer_lag(consumer, [0, 1]) == {0: 10, 1: 10}
    assert consumer_lag(consumer, [0, 1], fresh=True) == {0: 70, 1: 35}
    assert consumer.broker_calls == [0, 1]
    assert consumer_lag(consumer, [0, 1], fresh=True, fallback_budget_s=0) == {0: 10, 1: 10}


class FakeIngestBuffer(FakeBuffer):
    def segment_states(self, partition: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(new=partition + 1), SimpleNamespace(new=10)]


class FakeIngestor:
    def __init__(self) -> None:
        self.consumer = FakeConsumer(
            {0: 90, 1: -1001}, {0: 100, 1: 50}, unfetched=set(), cached={0: 95, 1: 45}
        )
        self.buffer = FakeIngestBuffer()
        self.stats = FakeStats(consumed=5)
        self.paused = True

    def owned_partitions(self) -> frozenset[int]:
        return frozenset({0, 1})


def test_refresh_reads_the_ingestor() -> None:
    m = Metrics(slow_refresh_s=3600)
    ing = FakeIngestor()
    m.refresh(ing, queue_depth=4)
    s = _samples(m.render().decode())
    assert s[("ctr_worker_events_consumed_total", ())] == 5
    assert s[("ctr_worker_ingest_paused", ())] == 1
    assert s[("ctr_worker_train_queue_depth", ())] == 4
    assert s[("ctr_worker_consumer_lag", (("partition", "1"),))] == 10
    assert s[("ctr_worker_buffer_new_events", (("partition", "0"),))] == 11
    ing.consumer.positions[0] = 100
    m.refresh(ing)  # within slow_refresh_s: lag is not re-read
    assert _samples(m.render().decode())[("ctr_worker_consumer_lag", (("partition", "0"),))] == 10
    m.refresh(ing, force=True)
    assert _samples(m.render().decode())[("ctr_worker_consumer_lag", (("partition", "0"),))] == 0


def test_training_context_counts_decision_and_failure() -> None:
    m = Metrics()
    with m.training("segment") as run:
        run.decision = "rejected"
    with pytest.raises(RuntimeError), m.training("shared"):
        raise RuntimeError("oom")
    s = _samples(m.render().decode())
    assert s[("ctr_worker_trainings_started_total", (("scope", "segment"),))] == 1
    assert s[("ctr_worker_trainings_rejected_total", (("scope", "segment"),))] == 1
    assert s[("ctr_worker_trainings_failed_total", (("scope", "shared"),))] == 1
    assert s[("ctr_worker_training_duration_seconds_count", (("scope", "shared"),))] == 1


def test_dependency_errors_follow_the_ingestor() -> None:
    """Broker trouble (librdkafka's error callback) and Redis outages show in /metrics, not only in logs."""
    from worker.stream.ingest import IngestStats

    m = Metrics()
    stats = IngestStats(kafka_errors=3, redis_outages=1)
    m.sync_ingest(stats)
    stats.kafka_errors = 5
    m.sync_ingest(stats)
    text = m.render().decode()
    assert 'ctr_worker_dependency_errors_total{dependency="kafka"} 5.0' in text
    assert 'ctr_worker_dependency_errors_total{dependency="redis"} 1.0' in text
