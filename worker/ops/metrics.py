"""Prometheus metrics: the worker's counters, gauges and histograms, and the online (prequential) quality
gauges computed from `worker.ops.quality`.

Everything lives in one `Metrics` object with its own `CollectorRegistry`, not prometheus-client's global
one, so tests (and a process hosting several workers) can build as many as they like. Serving them over
HTTP is `worker.ops.http`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from worker.ops.lag import consumer_lag
from worker.ops.quality import Prequential

log = structlog.get_logger(__name__)

PREFIX = "ctr_worker_"
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
    "ctr_worker_trainings_pending",
    "ctr_worker_trainings_started_total",
    "ctr_worker_trainings_promoted_total",
    "ctr_worker_trainings_rejected_total",
    "ctr_worker_trainings_failed_total",
    "ctr_worker_training_duration_seconds",
    "ctr_worker_scoring_duration_seconds",
    "ctr_worker_scores_published_total",
    "ctr_worker_score_requests_total",
    "ctr_worker_segments_expired_total",
    "ctr_worker_online_auc",
    "ctr_worker_online_logloss",
    "ctr_worker_online_window_events",
    "ctr_worker_ready",
)


class _ReadinessCollector:
    """`ctr_worker_ready` at scrape time, from the same cached checks as `/readyz`: an alert sees what a
    probe sees, on a thread of the HTTP server, never the poll loop's."""

    def __init__(self, ready: Callable[[], dict[str, bool]]) -> None:
        self.ready = ready

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(f"{PREFIX}ready", "")]

    def collect(self) -> Iterator[Metric]:
        try:
            ok = all(self.ready().values())
        except Exception:
            ok = False
        yield GaugeMetricFamily(
            f"{PREFIX}ready",
            "1 while /readyz answers 200 (partitions assigned, Kafka and Redis answer, Redis takes writes, "
            "model loaded), else 0.",
            value=1.0 if ok else 0.0,
        )


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
    """What prequential scoring reads of an event; the scoring itself is the caller's."""

    @property
    def event_id(self) -> str: ...
    @property
    def segment(self) -> str: ...
    @property
    def clicked(self) -> int: ...


E = TypeVar("E", bound=_Event)


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
            "Kafka client errors (broker down, transport), Redis outages ingest waited out, writes Redis "
            "refused for lack of memory (redis_oom, counted under redis too) and consume batches retried "
            "because the DLQ did not confirm their dead letters (dlq).",
            ["dependency"],
            registry=r,
        )
        for dependency in ("kafka", "redis", "redis_oom", "dlq"):
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
        self.trainings_pending = Gauge(
            f"{p}trainings_pending",
            "Trainings due and not yet done: segments queued or training (a cooldown or back-off wait is "
            "not counted), plus 1 while a shared run is due or running. 0 with no lag: the worker is idle.",
            registry=r,
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
            f"{p}score_requests",
            "Score requests handled, by outcome: answered, rejected (invalid) or failed (scoring raised); "
            "rejected and failed ones go to the DLQ.",
            ["outcome"],
            registry=r,
        )
        self.segments_expired = Counter(
            f"{p}segments_expired",
            "Idle segments deleted after WORKER_SEGMENT_RETENTION_S without events.",
            registry=r,
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
        for outcome in ("answered", "rejected", "failed"):
            self.score_requests.labels(outcome=outcome)
        self.prequential = Prequential(window=window, max_segments=max_segments)
        self.registry.register(_PrequentialCollector(self.prequential))
        self._readiness: _ReadinessCollector | None = None
        self.slow_refresh_s = slow_refresh_s
        self._seen: dict[str, int] = {}
        self._reasons: set[str] = set()
        self._last_slow = -math.inf
        self._partitions: set[int] = set()

    # Training

    def watch_readiness(self, ready: Callable[[], dict[str, bool]]) -> None:
        """Export `ctr_worker_ready` from `ready` (the `/readyz` checks); once per registry."""
        if self._readiness is None:
            self._readiness = _ReadinessCollector(ready)
            self.registry.register(self._readiness)

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
        for name, dependency in (
            ("kafka_errors", "kafka"),
            ("redis_outages", "redis"),
            ("redis_oom", "redis_oom"),
            ("dlq_failures", "dlq"),
        ):
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

    def refresh(
        self,
        ingestor: _Ingestor,
        queue_depth: int | None = None,
        force: bool = False,
        pending: int | None = None,
    ) -> None:
        """Call from the poll loop after each `poll_once()`.

        Every call: trainings pending, ingest counters, paused flag, queue depth (all in memory). Pending
        is set before the counters, so a scrape that sees an event counted also sees the training it
        made due (the live evaluation waits on both). Every `slow_refresh_s`:
        consumer lag (from the consumer's cached high watermarks, or the broker's while ingest is
        paused) and buffered new events per partition (one Redis pipeline per partition). Errors are
        logged, never raised: a metrics read must not stop ingest.
        """
        if pending is not None:
            self.trainings_pending.set(pending)
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
        score: Callable[[str, Sequence[E]], tuple[Any, int]],
        events: Sequence[E],
    ) -> int:
        """Score events the serving models have not learned from yet, and record them prequentially.

        Call on the compute thread right before a training consumes `events`. Per segment, only the last
        `window` events are scored (older ones would fall out of the window anyway). Returns events
        recorded. Never raises: a failed measurement must not cost the training. `score(segment, events)`
        returns (probabilities, version), e.g. `Learner.score_events`.
        """
        by_segment: dict[str, list[E]] = {}
        for ev in events:
            by_segment.setdefault(ev.segment, []).append(ev)
        recorded = 0
        for segment, evs in by_segment.items():
            evs = evs[-self.prequential.window :]
            started = time.perf_counter()
            try:
                probs, _ = score(segment, evs)
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
