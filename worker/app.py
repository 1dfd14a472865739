"""`python -m worker run`: ingest, train and publish, wired together. The thin orchestrator.

Threads:
- main: the input consumer's poll loop (via `Ingestor`), the score-request consumer, the producer's
  `poll()`. It never waits for a training.
- compute: owns the models (`Learner`); answers score requests first, then runs a due shared run, then
  one due segment training from the bounded queue. When that queue is full, ingest pauses its partitions.

Shutdown (SIGTERM or SIGINT): stop consuming, let the running training finish within the grace period
(or abandon it: nothing is recorded before its adapter directory is complete), flush the producer, exit 0.
A second signal exits at once; Redis writes are atomic scripts and adapters are renamed into place, so
nothing is left half-written.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from types import FrameType
from typing import Any

import numpy as np
import redis
import structlog
from confluent_kafka import KafkaError, KafkaException, Message
from pydantic import ValidationError

from worker.config import ConfigError, Settings, load_settings
from worker.events import ScoreRequest, ScoreUpdate
from worker.learn.learner import Abandoned, Learner, Serving
from worker.logs import configure_logging
from worker.ops.http import MetricsServer, Readiness
from worker.ops.http import start as start_metrics
from worker.ops.metrics import Metrics
from worker.state import client as redis_clients
from worker.state import pins
from worker.state.buffer import Buffer
from worker.state.client import RedisClient
from worker.state.keys import shared_lock_key
from worker.state.lock import Lock
from worker.state.pool import Pool, group_new, pool
from worker.state.registry import SHARED_SEGMENT, Registry, VersionRecord
from worker.state.retention import sweep as expire_idle_segments
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics, make_consumer
from worker.stream.lease import Lease
from worker.stream.publish import Publisher, PublishError
from worker.stream.trigger import DueSegment, Trigger

log = structlog.get_logger(__name__)

REQUEST_QUEUE = 256
SHARED_CHECK_S = 2.0
"""How often the group's shared trainer counts the new events of every partition."""
SHARED_LOCK_TTL_S = 30.0
"""How long a shared run's lock outlives a holder that stopped renewing it (a crash, a stall)."""
OUTBOX_CHECK_S = 30.0
"""How often every owned partition's registry outbox is read (one pipelined round trip per partition)."""
EXPIRY_CHECK_S = 60.0
"""How often owned partitions are swept for segments idle longer than `segment_retention_s`."""


@dataclass
class WorkerStats:
    trainings: dict[str, int] = field(default_factory=lambda: {"promoted": 0, "rejected": 0, "failed": 0})
    shared_runs: dict[str, int] = field(default_factory=lambda: {"promoted": 0, "rejected": 0, "failed": 0})
    scores_published: int = 0
    requests_answered: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0


class Outcome(Enum):
    """How a segment job ended, which decides its back-off: it counted, it waits for a shared model, or
    it failed (backed off twice as long each time in a row)."""

    DONE = "done"
    WAIT = "wait"
    FAILED = "failed"


class StartupError(RuntimeError):
    """A dependency (Kafka, Redis, the model store) is unusable; the message says which and why."""


def check_dependencies(settings: Settings, client: RedisClient) -> None:
    """Fail at start-up, with the setting to look at, rather than on the first event."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise StartupError(f"Redis refused the credentials in WORKER_REDIS_URL: {exc}") from None
    except redis.RedisError as exc:
        raise StartupError(f"Redis at WORKER_REDIS_URL is not reachable: {exc}") from None
    check_kafka(settings)
    try:
        settings.model_store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"WORKER_MODEL_STORE={settings.model_store} is not usable: {exc}") from None


def check_kafka(settings: Settings, timeout_s: float = 15.0) -> None:
    """A metadata request, failing at once on refused credentials instead of waiting out the timeout."""
    from confluent_kafka.admin import AdminClient

    from worker.stream.kafka import client_config

    refused: list[str] = []

    def on_error(err: KafkaError) -> None:
        if err.code() == KafkaError._AUTHENTICATION:
            refused.append(err.str())

    conf: dict[str, Any] = {**client_config(settings), "error_cb": on_error}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=1.0)
            return
        except KafkaException as exc:
            last = exc
        admin.poll(0)
        if refused:
            raise StartupError(
                "Kafka refused the credentials of WORKER_KAFKA_SASL_USERNAME / WORKER_KAFKA_SASL_PASSWORD "
                f"({settings.kafka_sasl_mechanism}): {refused[0]}"
            )
    raise StartupError(
        f"Kafka at WORKER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} did not answer within "
        f"{timeout_s:.0f} s: {last}"
    )


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self._health_redis = redis_clients.from_settings(settings, socket_timeout=1, socket_connect_timeout=1)
        self.readiness = Readiness(
            {
                "partitions_assigned": lambda: bool(self.ingestor.owned_partitions()),
                "kafka": lambda: bool(
                    self.publisher.producer.list_topics(settings.input_topic, timeout=2).topics
                ),
                "redis": lambda: bool(self._health_redis.ping()),
                "redis_writable": lambda: self.ingestor.redis_writable(),
                "model_loaded": lambda: self.learner is not None,
            }
        )
        self.redis: RedisClient = redis_clients.from_settings(settings, socket_timeout=30)
        self.metrics_server: MetricsServer | None = None
        self.buffer = Buffer(settings, self.redis)
        self.registry = Registry.from_settings(settings, self.redis)
        self.publisher = Publisher(settings)
        self.train_jobs: queue.Queue[DueSegment] = queue.Queue(settings.train_queue_size)
        self.requests: queue.Queue[Message] = queue.Queue(REQUEST_QUEUE)
        self.trigger = Trigger(settings, self.train_jobs, self.buffer)
        self.ingestor = Ingestor(
            settings,
            buffer=self.buffer,
            trigger=self.trigger,
            before_revoke=self._before_revoke,
        )
        self._training_partition: int | None = None
        self._training_done = threading.Event()
        self._training_done.set()
        self.request_consumer = make_consumer(
            settings,
            **{
                "group.id": f"{settings.group_id}-requests",
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
            },
        )
        self.learner: Learner | None = None
        self.stats = WorkerStats()
        self.stop = threading.Event()
        self.lease = Lease(settings, before_revoke=self._before_lease_revoke)
        self._input_partitions = 0
        self._group_new = 0
        self._group_checked = 0.0
        self._shared_running = False
        self._shared_lock = Lock(
            self.redis, shared_lock_key(settings.redis_prefix, settings.input_topic), SHARED_LOCK_TTL_S
        )
        self._housekept = 0.0
        self._outbox_checked = 0.0
        self._expiry_checked = 0.0
        self._outbox_owned: frozenset[int] = frozenset()
        self._pins_seen = -1
        self._failures: dict[tuple[int, str], int] = {}
        self._compute_done = threading.Event()
        self._compute = threading.Thread(target=self._compute_loop, name="compute", daemon=True)
        self._signals = 0

    # ---------------------------------------------------------------- main thread

    def _before_lease_revoke(self) -> None:
        """Let a running shared training end before the lease moves, so the next holder starts from its
        result rather than being refused the shared-run lock (which is what keeps two runs apart once
        this wait is over; a drain has already waited out its share of the grace period)."""
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self._shared_running and not self.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _before_revoke(self, partitions: set[int]) -> None:
        """A rebalance takes partitions away: let a training of one of them finish and be recorded first,
        so the next owner starts from its result and never trains the same segment at the same time.
        While draining, the drain itself has already waited out its share of the grace period."""
        if self.stop.is_set():
            return
        if self._training_partition in partitions and not self._training_done.wait(
            self.settings.drain_grace_s
        ):
            log.warning(
                "revoking while a training still runs; its result will be dropped",
                partitions=sorted(partitions),
            )

    def _poll_requests(self) -> None:
        if self.requests.full():
            return
        for msg in self.request_consumer.consume(min(64, REQUEST_QUEUE - self.requests.qsize()), 0):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.error("request_consume_error", error=str(err))
                continue
            self.requests.put_nowait(msg)

    def start(self) -> None:
        """The start-up I/O, kept out of `__init__` so building a worker touches nothing: dependency
        checks that name the setting to fix, the metrics endpoint, the topics."""
        check_dependencies(self.settings, self.redis)
        try:
            self.metrics_server = start_metrics(self.settings, self.readiness, metrics=self.metrics)
        except OSError as exc:
            raise StartupError(str(exc)) from None
        s = self.settings
        ensure_topics(s, [s.input_topic, s.dlq_topic, s.scores_topic, s.versions_topic, s.requests_topic])
        ensure_topics(s, [s.lease_topic], partitions=1)
        self._input_partitions = len(
            self.publisher.producer.list_topics(s.input_topic, timeout=10).topics[s.input_topic].partitions
        )

    def run(self) -> int:
        """Serve until `stop` is set, then drain; returns the exit code."""
        log.info("starting", group=self.settings.group_id, topic=self.settings.input_topic)
        self.learner = Learner(self.settings, self.registry)
        self._compute.start()
        self.ingestor.subscribe()
        self.lease.subscribe()
        self.request_consumer.subscribe([self.settings.requests_topic])
        try:
            while not self.stop.is_set():
                try:
                    self.ingestor.poll_once()
                    self.lease.poll()
                except redis.RedisError as exc:
                    self.ingestor.recover(self.stop, exc)
                    continue
                self.metrics.refresh(
                    self.ingestor, queue_depth=self.train_jobs.qsize(), pending=self.trainings_pending()
                )
                self._poll_requests()
                self.publisher.poll(0)
                if self._compute_done.is_set():
                    log.error("compute thread stopped unexpectedly")
                    break
        finally:
            self._drain()
        return 0

    def _drain(self) -> None:
        started = time.monotonic()
        grace = self.settings.drain_grace_s
        log.info("draining", grace_s=grace)
        self.stop.set()
        self._compute.join(timeout=max(0.0, grace * 0.8 - (time.monotonic() - started)))
        if self._compute.is_alive():
            log.warning("abandoning the running training: grace period is over")
        self.ingestor.close()
        try:
            self.lease.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("lease consumer close failed", error=str(exc))
        try:
            self.request_consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("request consumer close failed", error=str(exc))
        remaining = max(1.0, grace - (time.monotonic() - started))
        try:
            self.publisher.flush(remaining)
        except Exception as exc:
            log.error("flush failed", error=str(exc))
        log.info("stopped", seconds=round(time.monotonic() - started, 3), **self.publisher.stats())
        if self.metrics_server is not None:
            self.metrics_server.close()

    def compute_busy(self) -> bool:
        return self._compute.is_alive()

    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("signal: draining", signal=signal.Signals(signum).name)
        self.stop.set()

    # ---------------------------------------------------------------- compute thread

    def _compute_loop(self) -> None:
        """One job per turn; a failing job (Redis down) is logged and the loop goes on. A score request
        never ends here: `_answer` dead-letters one it cannot answer, so its requester learns."""
        try:
            while not self.stop.is_set():
                try:
                    self._compute_once()
                except Exception:
                    log.exception("compute job failed; continuing")
                    self.stop.wait(1.0)
        finally:
            self._compute_done.set()

    def _compute_once(self) -> None:
        try:
            self._answer(self.requests.get_nowait())
            return
        except queue.Empty:
            pass
        now = time.monotonic()
        if now - self._housekept >= SHARED_CHECK_S:
            self._housekept = now
            self._count_group_new()
            self._refresh_stale_partitions()
            self._notice_pins()
            self._drain_outboxes()
            self._expire_idle()
        if self._shared_due():
            self._run_shared()
            return
        try:
            job = self.train_jobs.get(timeout=0.1)
        except queue.Empty:
            return
        self._run_segment(job)

    def trainings_pending(self) -> int:
        """Segments queued or training (until `Trigger.done`), plus 1 while a shared run is due or runs.
        The flag is set before `_run_shared` resets the count and read after `_shared_due`, so a reader
        never sees neither."""
        return len(self.trigger.queued()) + (1 if self._shared_due() or self._shared_running else 0)

    def _shared_due(self) -> bool:
        """This worker holds the group's lease and enough new events arrived in the whole group: the
        bootstrap minimum while no shared model serves, else `shared_every`. Reads only numbers the
        compute thread keeps (`_count_group_new`), so a metrics scrape may call it."""
        if not self.lease.held():
            return False
        serving = self.learner is not None and self.learner.shared is not None
        s = self.settings
        return self._group_new >= (s.shared_every if serving else s.shared_bootstrap_min_events)

    def _count_group_new(self, force: bool = False) -> None:
        """New events in every partition of the input topic since the last shared run, at most every
        `SHARED_CHECK_S` (`worker.state.pool.group_new`: one read per partition)."""
        now = time.monotonic()
        if not self.lease.held() or (not force and now - self._group_checked < SHARED_CHECK_S):
            return
        self._group_checked = now
        self._group_new = group_new(self.buffer, self._input_partitions)

    def _pool(self) -> Pool:
        """Every segment of every partition, owned here or not, within the pool's bounds
        (`worker.state.pool`)."""
        return pool(self.buffer, self._input_partitions, self.settings)

    def _run_shared(self) -> VersionRecord | None:
        """One shared run of the group's trainer. What it took as new is marked in Redis after its
        decision is recorded: a crash before that trains the same events again (nothing was recorded),
        never after.

        The group's shared-run lock (`worker.state.lock`) is held from before the pooling until the
        events are marked: a lease that moved while a run still trains elsewhere cannot start a second
        one. A run refused the lock is skipped and tried again after the next count of new events."""
        assert self.learner is not None
        if not self._shared_lock.acquire():
            self._group_new = 0
            log.info(
                "shared run skipped: another shared run holds the lock", holder=self._shared_lock.holder()
            )
            return None
        self._shared_running = True
        try:
            pooled = self._pool()
            new, older, partitions = pooled.new, pooled.older, pooled.partitions
            self._group_new = 0
            if not new:
                # The counters moved but the marks already cover every buffered event (a restored
                # Redis): take them, or the due count would start an empty run every few seconds.
                self.buffer.mark_shared_counted(pooled.counters)
                return None
            log.info("shared training", events=len(new), older=len(older), partitions=partitions)
            try:
                with self.metrics.training("shared") as run:
                    rec, _ = self.learner.train_shared(
                        new, older, (0, len(new)), still_owned=self._shared_lock.held
                    )
                    run.decision = rec.decision
            except Abandoned as exc:
                log.warning("shared run abandoned: it outlived its lock", reason=str(exc))
                return None
            self.buffer.mark_shared_seen(pooled.marks)
            self.buffer.mark_shared_counted(pooled.counters)
        finally:
            self._shared_running = False
            self._shared_lock.release()
        self.stats.shared_runs[rec.decision] += 1
        log.info(
            "shared run",
            model_version=rec.version,
            decision=rec.decision,
            reason=rec.reason,
            events=len(new),
            partitions=partitions,
            seconds=rec.train_seconds,
        )
        self._publish_outboxes(self.learner.shared_registry, [SHARED_SEGMENT])
        if rec.decision == "promoted":
            self._refresh_stale_partitions()
        return rec

    def _refresh_stale_partitions(self) -> None:
        """A new shared champion (promoted here or by the group's trainer) changes what every segment
        is served by: refreshed scores for each owned partition's segments whose scores were published
        for another shared version. The marker is per partition in Redis, so a crash or a rebalance
        between a promotion and its scores publishes them from whoever owns the partition next."""
        assert self.learner is not None
        self.learner.refresh_shared()
        version = self.learner.shared_version
        if not version:
            return
        self.trigger.shared_serves()
        for partition in sorted(self.ingestor.owned_partitions()):
            if self.buffer.scores_shared_version(partition) == version:
                continue
            for segment in self.buffer.segments(partition):
                self._publish_scores(partition, segment)
            self.publisher.flush(self.settings.drain_grace_s)
            self.buffer.mark_scores_shared_version(partition, version)

    def _notice_pins(self) -> None:
        """A pin or unpin (`models pin`) moved the group's counter: read every owned partition's outbox
        now rather than at the next `OUTBOX_CHECK_S`, so the pinned segment's model-version event and
        scores go out within seconds. A missed move costs only that wait: the outbox has them."""
        seen = pins.changes(self.redis, self.settings.redis_prefix)
        if seen != self._pins_seen:
            self._pins_seen = seen
            self._outbox_checked = time.monotonic() - OUTBOX_CHECK_S

    def _drain_outboxes(self) -> None:
        """Decisions recorded but not yet acknowledged by Kafka (a crash between the two, a failed
        delivery, a rollback): a newly owned partition's segments at the next housekeeping, which is
        also how start-up drains them, every owned one's each `OUTBOX_CHECK_S`. The shared model's are
        the lease holder's: it records them, and a crashed trainer's pass with the lease."""
        assert self.learner is not None
        now = time.monotonic()
        owned = self.ingestor.owned_partitions()
        due = owned - self._outbox_owned
        if now - self._outbox_checked >= OUTBOX_CHECK_S:
            self._outbox_checked, due = now, owned
            if self.lease.held():
                self._publish_outboxes(self.learner.shared_registry, [SHARED_SEGMENT])
        self._outbox_owned = owned
        for partition in sorted(due):
            self._publish_outboxes(self.registry, self.buffer.segments(partition), partition)

    def _expire_idle(self) -> None:
        """Each `EXPIRY_CHECK_S`: the owned partitions' segments idle past `segment_retention_s` go, in
        Redis, in the store and in memory (`worker.state.retention`)."""
        now = time.monotonic()
        if now - self._expiry_checked < EXPIRY_CHECK_S:
            return
        self._expiry_checked = now
        expired = expire_idle_segments(
            self.buffer,
            self.registry,
            self.ingestor.owned_partitions(),
            self.settings.segment_retention_s,
            self._forget_segment,
            all_partitions=range(self._input_partitions),
            epochs=self.ingestor.epoch,
        )
        self.metrics.segments_expired.inc(len(expired))

    def _forget_segment(self, partition: int, segment: str) -> None:
        assert self.learner is not None
        self.learner.evict(segment)
        self.trigger.forget(partition, segment)
        self.metrics.prequential.forget(segment)

    def _publish_outboxes(
        self, registry: Registry, segments: list[str], partition: int | None = None
    ) -> None:
        """Publish each recorded version above a segment's published pointer (its model-version event)
        and, when its champion moved, the segment's refreshed scores; flush; then move the pointers.
        At least once: a crash before the pointer moves publishes them again, and consumers dedupe
        model-version events by (segment, version). A failed delivery is retried by `_drain_outboxes`.
        The shared model's scores are every partition's, refreshed by `_refresh_stale_partitions`."""
        pending = registry.outboxes(segments)
        if not pending:
            return
        for box in pending:
            for rec in box.records:
                self.publisher.version(rec.event())
            if box.rescore and partition is not None:
                self._publish_scores(partition, box.segment)
        try:
            self.publisher.flush(self.settings.drain_grace_s)
        except PublishError as exc:
            log.warning("publication failed; the outbox retries it", partition=partition, error=str(exc))
            return
        for box in pending:
            registry.mark_published(box)
        log.info(
            "published",
            partition=partition,
            versions={box.segment: [r.version for r in box.records] for box in pending},
            rescored=[box.segment for box in pending if box.rescore and partition is not None],
        )

    def _backoff_s(self, job: DueSegment, outcome: Outcome) -> float:
        """0 after a run that counted; a fixed wait while no shared model serves; after failures in a row,
        twice as long each time."""
        key = (job.partition, job.segment)
        if outcome is Outcome.DONE:
            self._failures.pop(key, None)
            return 0.0
        if outcome is Outcome.WAIT:
            return self.settings.train_backoff_s
        self._failures[key] = self._failures.get(key, 0) + 1
        return float(min(3600.0, self.settings.train_backoff_s * 2 ** (self._failures[key] - 1)))

    def _run_segment(self, job: DueSegment) -> None:
        bound = log.bind(segment=job.segment, partition=job.partition)
        outcome = Outcome.FAILED
        try:
            outcome = self._train_segment(job, bound)
        except Exception:
            bound.exception("training job failed")
        finally:
            self._training_partition = None
            self._training_done.set()
            backoff = self._backoff_s(job, outcome)
            if backoff:
                bound.info("backing off", seconds=backoff)
            self.trigger.done(job, backoff_s=backoff, until_shared=outcome is Outcome.WAIT)

    def _train_segment(self, job: DueSegment, bound: Any) -> Outcome:
        assert self.learner is not None
        epoch = self.ingestor.epoch(job.partition)
        if not self.trigger.still_owned(job) or epoch is None:
            bound.info("skipping training: partition no longer owned")
            return Outcome.DONE
        snap = self.buffer.training_snapshot(job.partition, job.segment)
        if not snap.new_events:
            return Outcome.DONE
        seq = (snap.seq_from, snap.seq_to)
        bound.info("training", events=len(snap.new_events), seq_from=snap.seq_from, seq_to=snap.seq_to)
        self.learner.refresh_shared()
        if self.learner.shared is None and not self._bootstrap_shared():
            bound.info("no shared model serves yet: segment waits")
            return Outcome.WAIT
        self.metrics.score_before_learning(self.learner.score_events, snap.new_events)
        self._training_partition = job.partition
        self._training_done.clear()
        try:
            with self.metrics.training("segment") as run:
                out = self.learner.train_segment(
                    job.segment,
                    snap.new_events,
                    snap.sample_events,
                    seq,
                    lambda: self.trigger.still_owned(job),
                )
                run.decision = out[0].decision if out is not None else "failed"
        except Abandoned as exc:
            bound.warning("training abandoned", reason=str(exc))
            return Outcome.DONE
        if out is None:
            bound.info("no shared model serves yet: segment waits")
            return Outcome.WAIT
        rec, _ = out
        self.stats.trainings[rec.decision] += 1
        bound.info(
            "segment run",
            model_version=rec.version,
            decision=rec.decision,
            reason=rec.reason,
            events=len(snap.new_events),
            seq_from=snap.seq_from,
            seq_to=snap.seq_to,
            seconds=rec.train_seconds,
        )
        trimmed = 0
        if rec.decision != "failed":
            trimmed = self.buffer.mark_trained(job.partition, job.segment, snap.seq_to, epoch=epoch)
        if trimmed < 0:
            bound.warning("partition owned elsewhere since the training began: nothing trimmed")
        self._publish_outboxes(self.registry, [job.segment], job.partition)
        return Outcome.FAILED if rec.decision == "failed" else Outcome.DONE

    def _bootstrap_shared(self) -> bool:
        """A due segment while no shared model serves: the group's trainer runs the first shared run now
        if enough events are buffered group-wide; on any other worker the segment waits for it."""
        assert self.learner is not None
        if self.learner.shared is not None or not self.lease.held():
            return False
        self._count_group_new(force=True)
        if not self._shared_due():
            return False
        rec = self._run_shared()
        return rec is not None and rec.decision == "promoted"

    def _publish_scores(self, partition: int, segment: str) -> None:
        assert self.learner is not None
        candidates = self.buffer.candidates(partition, segment)
        if not candidates:
            return
        serving = self.learner.serving(segment)
        with self.metrics.scoring_duration.labels(kind="refresh").time():
            probs, _ = self.learner.score(
                segment, [(c.query, c.item_text) for c in candidates], serving=serving
            )
        updates = self._updates(segment, [(c.query, c.item_id) for c in candidates], probs, serving)
        published = self.publisher.scores(updates)
        self.stats.scores_published += published
        self.metrics.scores_published.labels(kind="refresh").inc(published)

    def _updates(
        self,
        segment: str,
        items: Sequence[tuple[str | None, str]],
        probs: np.ndarray,
        serving: Serving,
        request_id: str | None = None,
    ) -> list[ScoreUpdate]:
        """Score updates of (query, item id) pairs, stamped with the versions that scored them."""
        now = datetime.now(UTC)
        return [
            ScoreUpdate(
                segment=segment,
                query=query,
                item_id=item_id,
                score=float(p),
                model_version=serving.version,
                shared_version=serving.shared_version,
                scored_at=now,
                request_id=request_id,
            )
            for (query, item_id), p in zip(items, probs, strict=True)
        ]

    def _answer(self, msg: Message) -> None:
        """Answer a score request on the scores topic. One that is invalid, or whose scoring raises, goes
        to the dead-letter topic with its reason (`invalid_request`, `scoring_failed`), so the requester
        learns instead of waiting; either way its offset is stored, so a request that always fails is not
        retried forever."""
        try:
            request = ScoreRequest.model_validate_json(msg.value() or b"")
        except ValidationError as exc:
            self.stats.requests_rejected += 1
            self.metrics.score_requests.labels(outcome="rejected").inc()
            log.warning("bad score request", offset=msg.offset(), error=str(exc)[:300])
            self.publisher.dead_letter(msg, "invalid_request", str(exc))
        else:
            try:
                self._score_request(request)
            except Exception as exc:
                self.stats.requests_failed += 1
                self.metrics.score_requests.labels(outcome="failed").inc()
                log.exception(
                    "score request failed",
                    request_id=request.request_id,
                    offset=msg.offset(),
                    partition=msg.partition(),
                )
                self.publisher.dead_letter(msg, "scoring_failed", f"{type(exc).__name__}: {exc}")
        self.request_consumer.store_offsets(message=msg)

    def _score_request(self, request: ScoreRequest) -> None:
        assert self.learner is not None
        pairs = [(p.query, p.item_text) for p in request.pairs]
        serving = self.learner.serving(request.segment)
        with self.metrics.scoring_duration.labels(kind="request").time():
            probs, _ = self.learner.score(request.segment, pairs, serving=serving)
        items = [(p.query, p.item_id) for p in request.pairs]
        self.publisher.scores(self._updates(request.segment, items, probs, serving, request.request_id))
        self.stats.requests_answered += 1
        self.metrics.score_requests.labels(outcome="answered").inc()
        self.metrics.scores_published.labels(kind="request").inc(len(request.pairs))

    def summary(self) -> dict[str, Any]:
        return {
            "trainings": self.stats.trainings,
            "shared_runs": self.stats.shared_runs,
            "scores_published": self.stats.scores_published,
            "requests_answered": self.stats.requests_answered,
            "ingest": vars(self.ingestor.stats),
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--exit-after", type=float, default=None, metavar="S", help="drain and exit after S seconds"
    )


def cli_main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        worker = Worker(settings)  # a Redis Cluster client asks for the slot layout at once
    except redis.RedisError as exc:
        log.error("start-up failed", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        worker.start()
    except StartupError as exc:
        log.error("start-up failed", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, worker.handle_signal)
    signal.signal(signal.SIGINT, worker.handle_signal)
    if args.exit_after is not None:
        threading.Timer(args.exit_after, worker.stop.set).start()
    code = worker.run()
    if worker.compute_busy():
        # Abandon the training still running: nothing of it is recorded yet. Exiting the interpreter
        # under a running torch thread would abort the process instead of exiting cleanly.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
