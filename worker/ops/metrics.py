"""Prometheus metrics, online (prequential) model quality, and the `/metrics`, `/healthz`, `/readyz` server.

Everything lives in one `Metrics` object with its own `CollectorRegistry`, not prometheus-client's global
one, so tests (and a process hosting several workers) can build as many as they like. The HTTP server is
the standard library's, in a daemon thread: a scrape or a probe never touches the poll loop or the
compute thread, and it binds to `WORKER_METRICS_HOST` (127.0.0.1 unless told otherwise).

Online AUC and log loss are prequential: each event is scored by the serving model *before* any model
learns from it, so the numbers say how the model does on traffic it has not seen, with no holdout spent.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from worker.config import Settings
from worker.learn.history import fold_of

log = structlog.get_logger(__name__)

PREFIX = "ctr_worker_"
OTHER = "__other__"
"""Label value that pools the segments past the cardinality cap (a name no real segment is likely to use)."""

SCOPES = ("segment", "shared")
DECISIONS = ("promoted", "rejected", "failed")
TRAIN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
SCORE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_REASONS = 32
"""DLQ reason codes come from the code, but a cap keeps a bug from exploding the label set."""

# Every name a scrape can show (counters with `_total`, histograms by family name). The dashboard and
# docs/operations.md are tested against this list.
METRIC_NAMES: tuple[str, ...] = (
    "ctr_worker_events_consumed_total",
    "ctr_worker_events_buffered_total",
    "ctr_worker_events_deduplicated_total",
    "ctr_worker_events_stale_total",
    "ctr_worker_events_dead_lettered_total",
    "ctr_worker_dependency_errors_total",
    "ctr_worker_buffer_new_events",
    "ctr_worker_consumer_lag",
    "ctr_worker_ingest_paused",
    "ctr_worker_train_queue_depth",
    "ctr_worker_trainings_started_total",
    "ctr_worker_trainings_promoted_total",
    "ctr_worker_trainings_rejected_total",
    "ctr_worker_trainings_failed_total",
    "ctr_worker_training_duration_seconds",
    "ctr_worker_scoring_duration_seconds",
    "ctr_worker_scores_published_total",
    "ctr_worker_score_requests_total",
    "ctr_worker_online_auc",
    "ctr_worker_online_logloss",
    "ctr_worker_online_window_events",
)


# ------------------------------------------------------------------ online quality


def rank_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """ROC AUC by the Mann-Whitney rank sum, ties given their average rank (what sklearn computes).

    None when the labels hold one class only: AUC is undefined there, and a made-up 0.5 would read as
    a real (bad) number on a dashboard.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average rank within each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # ranks are 1-based: mean of start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float | None:
    """Mean binary cross-entropy, probabilities clipped so one confident miss cannot give infinity."""
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0:
        return None
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


class _Window:
    __slots__ = ("ids", "labels", "scores")

    def __init__(self, size: int) -> None:
        self.scores: deque[float] = deque(maxlen=size)
        self.labels: deque[int] = deque(maxlen=size)
        self.ids: deque[str | None] = deque(maxlen=size)

    def add(self, score: float, label: int, event_id: str | None) -> None:
        self.scores.append(score)
        self.labels.append(label)
        self.ids.append(event_id)


class Prequential:
    """Per segment, the last `window` (score, label) pairs scored before learning; AUC and log loss.

    Label cardinality is bounded: only the `max_segments` busiest segments (by events recorded) get their
    own window and label; all others share one pooled window under `OTHER`. A quieter segment is
    replaced only when another has strictly more traffic, so labels do not flap between equals. Memory
    is (max_segments + 1) windows plus one integer per segment seen (capped at `max_tracked`).
    """

    def __init__(self, window: int = 500, max_segments: int = 50, max_tracked: int = 100_000) -> None:
        if window < 2 or max_segments < 1:
            raise ValueError("window must be >= 2 and max_segments >= 1")
        self.window = window
        self.max_segments = max_segments
        self.max_tracked = max_tracked
        self._lock = threading.Lock()
        self._traffic: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}
        self._other = _Window(window)

    def record(
        self,
        segment: str,
        scores: Sequence[float] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Add pairs scored before any model learned from them; returns how many were new.

        With `event_ids`, an id already in the segment's window is skipped: the shared run and the
        segment run may both score the same new events first, and each must count once.
        """
        if len(scores) != len(labels) or (event_ids is not None and len(event_ids) != len(labels)):
            raise ValueError("scores, labels and event_ids must have the same length")
        with self._lock:
            self._traffic[segment] = self._traffic.get(segment, 0) + len(labels)
            if len(self._traffic) > self.max_tracked:
                self._prune_traffic()
            win = self._admit(segment)
            seen = set(win.ids) if event_ids is not None else set()
            added = 0
            for i, (score, label) in enumerate(zip(scores, labels, strict=True)):
                eid = event_ids[i] if event_ids is not None else None
                if eid is not None and eid in seen:
                    continue
                if eid is not None:
                    seen.add(eid)
                win.add(float(score), int(label), eid)
                added += 1
            return added

    def _admit(self, segment: str) -> _Window:
        win = self._windows.get(segment)
        if win is not None:
            return win
        if len(self._windows) < self.max_segments:
            win = self._windows[segment] = _Window(self.window)
            return win
        quietest = min(self._windows, key=lambda s: self._traffic.get(s, 0))
        if self._traffic[segment] > self._traffic.get(quietest, 0):
            del self._windows[quietest]
            win = self._windows[segment] = _Window(self.window)
            return win
        return self._other

    def _prune_traffic(self) -> None:
        keep = sorted(self._traffic.items(), key=lambda kv: kv[1], reverse=True)[: self.max_tracked // 2]
        self._traffic = dict(keep)
        for s in self._windows:
            self._traffic.setdefault(s, 0)

    def labelled_segments(self) -> list[str]:
        """Segments with their own label right now (at most `max_segments`), plus `OTHER` when used."""
        with self._lock:
            names = sorted(self._windows)
            return [*names, OTHER] if self._other.labels else names

    def snapshot(self) -> dict[str, tuple[float | None, float | None, int]]:
        """segment -> (AUC or None, log loss or None, pairs in window), for every label value."""
        with self._lock:
            wins = [(s, list(w.scores), list(w.labels)) for s, w in self._windows.items()]
            if self._other.labels:
                wins.append((OTHER, list(self._other.scores), list(self._other.labels)))
        return {s: (rank_auc(sc, lb), log_loss(sc, lb), len(lb)) for s, sc, lb in wins}


class _PrequentialCollector:
    """Computes the online gauges at scrape time, so label values that left the top N simply vanish."""

    def __init__(self, pq: Prequential) -> None:
        self.pq = pq

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(f"{PREFIX}online_auc", "", labels=["segment"]),
            GaugeMetricFamily(f"{PREFIX}online_logloss", "", labels=["segment"]),
            GaugeMetricFamily(f"{PREFIX}online_window_events", "", labels=["segment"]),
        ]

    def collect(self) -> Iterator[Metric]:
        auc = GaugeMetricFamily(
            f"{PREFIX}online_auc",
            "Champion's prequential ROC AUC on the last window of events, scored before learning.",
            labels=["segment"],
        )
        ll = GaugeMetricFamily(
            f"{PREFIX}online_logloss",
            "Champion's prequential log loss on the last window of events, scored before learning.",
            labels=["segment"],
        )
        n = GaugeMetricFamily(
            f"{PREFIX}online_window_events",
            "Scored events in the prequential window (small windows give noisy AUC).",
            labels=["segment"],
        )
        for segment, (a, loss, count) in sorted(self.pq.snapshot().items()):
            if a is not None:
                auc.add_metric([segment], a)
            if loss is not None:
                ll.add_metric([segment], loss)
            n.add_metric([segment], count)
        yield auc
        yield ll
        yield n


# ------------------------------------------------------------------ the metrics


class _IngestStats(Protocol):
    consumed: int
    added: int
    duplicates: int
    stale: int
    by_code: dict[str, int]


class _Ingestor(Protocol):
    """What `Metrics.refresh` reads from `worker.stream.ingest.Ingestor` (a protocol, so this module imports
    no Kafka or Redis code)."""

    consumer: Any
    buffer: Any
    stats: Any

    def owned_partitions(self) -> frozenset[int]: ...

    @property
    def paused(self) -> bool: ...


class _Event(Protocol):
    @property
    def event_id(self) -> str: ...
    @property
    def segment(self) -> str: ...
    @property
    def query(self) -> str | None: ...
    @property
    def item_text(self) -> str: ...
    @property
    def clicked(self) -> int: ...


@dataclass
class TrainingRun:
    """Handle of `Metrics.training`: set `decision` to promoted, rejected or failed."""

    started: float
    decision: str | None = None


class Metrics:
    """All of the worker's metrics, in a registry of their own."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        window: int = 500,
        max_segments: int = 50,
        slow_refresh_s: float = 15.0,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, PREFIX
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc.: the first thing to look at on OOM
        self.events_consumed = Counter(f"{p}events_consumed", "Input messages consumed.", registry=r)
        self.events_buffered = Counter(
            f"{p}events_buffered", "Valid new events written to Redis.", registry=r
        )
        self.events_deduplicated = Counter(
            f"{p}events_deduplicated", "Events dropped because their event_id was seen before.", registry=r
        )
        self.events_stale = Counter(
            f"{p}events_stale", "Messages at offsets already stored in Redis (a replay).", registry=r
        )
        self.dependency_errors = Counter(
            f"{p}dependency_errors",
            "Kafka client errors (broker down, transport) and Redis outages ingest waited out.",
            ["dependency"],
            registry=r,
        )
        for dependency in ("kafka", "redis"):
            self.dependency_errors.labels(dependency=dependency)
        self.events_dead_lettered = Counter(
            f"{p}events_dead_lettered", "Messages sent to the DLQ, by reason code.", ["reason"], registry=r
        )
        self.buffer_new_events = Gauge(
            f"{p}buffer_new_events",
            "Events buffered since the last training, per input partition.",
            ["partition"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            f"{p}consumer_lag",
            "High watermark minus this worker's position, per input partition.",
            ["partition"],
            registry=r,
        )
        self.ingest_paused = Gauge(
            f"{p}ingest_paused", "1 while ingest is paused because the training queue is full.", registry=r
        )
        self.train_queue_depth = Gauge(
            f"{p}train_queue_depth", "Due segments waiting for the compute thread.", registry=r
        )
        self.trainings_started = Counter(f"{p}trainings_started", "Trainings begun.", ["scope"], registry=r)
        self.trainings_promoted = Counter(
            f"{p}trainings_promoted", "Trainings whose challenger became champion.", ["scope"], registry=r
        )
        self.trainings_rejected = Counter(
            f"{p}trainings_rejected", "Trainings whose challenger lost the gate.", ["scope"], registry=r
        )
        self.trainings_failed = Counter(
            f"{p}trainings_failed", "Trainings that raised or could not be stored.", ["scope"], registry=r
        )
        self.training_duration = Histogram(
            f"{p}training_duration_seconds",
            "Wall time of one training, gate included.",
            ["scope"],
            buckets=TRAIN_BUCKETS,
            registry=r,
        )
        self.scoring_duration = Histogram(
            f"{p}scoring_duration_seconds",
            "Wall time of one scoring call (refresh: candidates after a promotion; request: a score "
            "request; prequential: new events before learning).",
            ["kind"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.scores_published = Counter(
            f"{p}scores_published", "Score updates produced to the scores topic.", ["kind"], registry=r
        )
        self.score_requests = Counter(
            f"{p}score_requests", "Score requests handled, by outcome.", ["outcome"], registry=r
        )
        for scope in SCOPES:
            for c in (
                self.trainings_started,
                self.trainings_promoted,
                self.trainings_rejected,
                self.trainings_failed,
            ):
                c.labels(scope=scope)
            self.training_duration.labels(scope=scope)
        for kind in ("refresh", "request", "prequential"):
            self.scoring_duration.labels(kind=kind)
        for kind in ("refresh", "request"):
            self.scores_published.labels(kind=kind)
        for outcome in ("answered", "rejected"):
            self.score_requests.labels(outcome=outcome)
        self.prequential = Prequential(window=window, max_segments=max_segments)
        self.registry.register(_PrequentialCollector(self.prequential))
        self.slow_refresh_s = slow_refresh_s
        self._seen: dict[str, int] = {}
        self._reasons: set[str] = set()
        self._last_slow = -math.inf
        self._partitions: set[int] = set()

    # Training

    def training_started(self, scope: str) -> float:
        """Count a start; returns a `time.perf_counter()` stamp for `training_finished`."""
        self.trainings_started.labels(scope=scope).inc()
        return time.perf_counter()

    def training_finished(self, scope: str, decision: str, started: float | None = None) -> None:
        """Count the decision (promoted, rejected or failed) and observe the duration since `started`."""
        counter = {
            "promoted": self.trainings_promoted,
            "rejected": self.trainings_rejected,
            "failed": self.trainings_failed,
        }.get(decision, self.trainings_failed)
        counter.labels(scope=scope).inc()
        if started is not None:
            self.training_duration.labels(scope=scope).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def training(self, scope: str) -> Iterator[TrainingRun]:
        """`with metrics.training("segment") as run: ...; run.decision = rec.decision`.

        Counts the start on entry; on exit the decision (failed when an exception escapes or none was
        set) and the duration. Enter it only when a training will really run.
        """
        run = TrainingRun(self.training_started(scope))
        try:
            yield run
        except BaseException:
            self.training_finished(scope, "failed", run.started)
            raise
        self.training_finished(scope, run.decision or "failed", run.started)

    # Ingest

    def sync_ingest(self, stats: _IngestStats) -> None:
        """Mirror the ingestor's cumulative counts into the counters (increments by the difference).

        Cheap: call it after every poll. The ingestor stays free of metrics code.
        """
        for name, counter in (
            ("consumed", self.events_consumed),
            ("added", self.events_buffered),
            ("duplicates", self.events_deduplicated),
            ("stale", self.events_stale),
        ):
            value = int(getattr(stats, name))
            delta = value - self._seen.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            self._seen[name] = value
        for name, dependency in (("kafka_errors", "kafka"), ("redis_outages", "redis")):
            value = int(getattr(stats, name, 0))
            delta = value - self._seen.get(name, 0)
            if delta > 0:
                self.dependency_errors.labels(dependency=dependency).inc(delta)
            self._seen[name] = value
        for code, value in stats.by_code.items():
            key = f"dlq.{code}"
            delta = value - self._seen.get(key, 0)
            if delta > 0:
                self.events_dead_lettered.labels(reason=self._reason(code)).inc(delta)
            self._seen[key] = value

    def _reason(self, code: str) -> str:
        if code in self._reasons:
            return code
        if len(self._reasons) < MAX_REASONS:
            self._reasons.add(code)
            return code
        return "other"

    def set_partitions(self, lag: Mapping[int, int], new_events: Mapping[int, int] | None = None) -> None:
        """Set the per-partition gauges; partitions no longer present lose their series."""
        current = set(lag) | set(new_events or {})
        for gone in self._partitions - current:
            for gauge in (self.consumer_lag, self.buffer_new_events):
                with contextlib.suppress(KeyError):
                    gauge.remove(str(gone))
        for partition, value in lag.items():
            self.consumer_lag.labels(partition=str(partition)).set(value)
        for partition, value in (new_events or {}).items():
            self.buffer_new_events.labels(partition=str(partition)).set(value)
        self._partitions = current

    def refresh(self, ingestor: _Ingestor, queue_depth: int | None = None, force: bool = False) -> None:
        """Call from the poll loop after each `poll_once()`.

        Every call: ingest counters, paused flag, queue depth (all in memory). Every `slow_refresh_s`:
        consumer lag (from the consumer's cached high watermarks, or the broker's while ingest is
        paused) and buffered new events per partition (one Redis pipeline per partition). Errors are
        logged, never raised: a metrics read must not stop ingest.
        """
        self.sync_ingest(ingestor.stats)
        self.ingest_paused.set(1 if ingestor.paused else 0)
        if queue_depth is not None:
            self.train_queue_depth.set(queue_depth)
        now = time.monotonic()
        if not force and now - self._last_slow < self.slow_refresh_s:
            return
        self._last_slow = now
        owned = sorted(ingestor.owned_partitions())
        try:
            lag = consumer_lag(ingestor.consumer, owned, ingestor.buffer, fresh=ingestor.paused)
            new = {p: sum(int(s.new) for s in ingestor.buffer.segment_states(p)) for p in owned}
        except Exception as exc:
            log.warning("metrics refresh failed", error=str(exc)[:300])
            return
        self.set_partitions(lag, new)

    # Scoring

    def score_before_learning(
        self,
        score: Callable[[str, list[tuple[str | None, str]], list[int | None]], tuple[Any, int]],
        events: Sequence[_Event],
    ) -> int:
        """Score events the serving models have not learned from yet, and record them prequentially.

        Call on the compute thread right before a training consumes `events`. Per segment, only the last
        `window` events are scored (older ones would fall out of the window anyway). Returns events
        recorded. Never raises: a failed measurement must not cost the training. `score` gets the events'
        history folds, so a label the shared model's query history already counted is not read back.
        """
        by_segment: dict[str, list[_Event]] = {}
        for ev in events:
            by_segment.setdefault(ev.segment, []).append(ev)
        recorded = 0
        for segment, evs in by_segment.items():
            evs = evs[-self.prequential.window :]
            started = time.perf_counter()
            try:
                pairs = [(e.query, e.item_text) for e in evs]
                probs, _ = score(segment, pairs, [fold_of(e.event_id) for e in evs])
            except Exception as exc:
                log.warning("prequential scoring failed", segment=segment, error=str(exc)[:300])
                continue
            self.scoring_duration.labels(kind="prequential").observe(time.perf_counter() - started)
            recorded += self.prequential.record(
                segment,
                np.asarray(probs, dtype=np.float64),
                [int(e.clicked) for e in evs],
                [e.event_id for e in evs],
            )
        return recorded

    def render(self) -> bytes:
        return generate_latest(self.registry)


def consumer_lag(
    consumer: Any,
    partitions: Iterable[int],
    buffer: Any = None,
    fallback_budget_s: float = 1.0,
    fresh: bool = False,
) -> dict[int, int]:
    """Lag per owned input partition: high watermark minus the next offset this worker will read.

    Uses confluent-kafka's cached watermarks (updated by every fetch response, no broker call). A
    partition with no fetch yet (just assigned) is asked from the broker instead, and so is every
    partition when `fresh` (ingest is paused: paused partitions are not fetched, so their cached
    watermark stops while producers go on), within `fallback_budget_s` in all, so the poll loop is never
    held for long; past the budget the cached value stands.
    Before the first message since assignment the consumer's position is unknown; the next offset stored
    in Redis (where ingest resumes) stands in, else the low watermark.
    """
    wanted = set(partitions)
    tps = [tp for tp in consumer.assignment() if tp.partition in wanted]
    if not tps:
        return {}
    stored: Mapping[int, int | None] = {}
    lags: dict[int, int] = {}
    deadline = time.monotonic() + fallback_budget_s
    for tp in consumer.position(tps):
        wm = consumer.get_watermark_offsets(tp, cached=True)
        if fresh or not wm or wm[1] < 0:
            left = deadline - time.monotonic()
            if left > 0.05:
                with contextlib.suppress(Exception):  # a broker error leaves the cached value
                    wm = consumer.get_watermark_offsets(tp, timeout=left, cached=False) or wm
            if not wm or wm[1] < 0:
                continue
        low, high = wm
        pos = tp.offset
        if pos < 0:
            if buffer is not None and not stored:
                stored = buffer.stored_offsets([t.partition for t in tps], tp.topic)
            pos = stored.get(tp.partition)
            if pos is None:
                pos = max(low, 0)
        lags[tp.partition] = max(0, high - pos)
    return lags


# ------------------------------------------------------------------ readiness


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


# ------------------------------------------------------------------ the server


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
    free port, see `.port`). Raises OSError naming the settings when the address cannot be bound."""
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
