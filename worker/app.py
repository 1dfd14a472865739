"""`python -m worker run`: ingest, train and publish, wired together. The composition root.

`Worker` builds the parts and runs them; what each job does, and in which order, is in `worker.jobs`
(a segment's training: `segment_job`; the group's shared run: `shared_job`; scores: `scoring`; the
registry's outboxes: `outboxes`; periodic checks: `housekeeping`), the start-up checks in `worker.startup`.

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
from types import FrameType
from typing import Any

import redis
import structlog
from confluent_kafka import KafkaException, Message

from worker.config import ConfigError, Settings, load_settings
from worker.jobs.housekeeping import Housekeeping
from worker.jobs.outboxes import Outboxes
from worker.jobs.scoring import REQUEST_QUEUE, Scoring
from worker.jobs.segment_job import SegmentJobs
from worker.jobs.shared_job import SharedJob
from worker.jobs.stats import WorkerStats
from worker.learn.learner import Learner
from worker.logs import configure_logging
from worker.ops.http import MetricsServer, Readiness
from worker.ops.http import start as start_metrics
from worker.ops.metrics import Metrics
from worker.startup import StartupError, check_dependencies
from worker.state import client as redis_clients
from worker.state.buffer import Buffer
from worker.state.client import RedisClient
from worker.state.registry import Registry
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics, make_consumer
from worker.stream.lease import Lease
from worker.stream.publish import Publisher
from worker.stream.trigger import DueSegment, Trigger

log = structlog.get_logger(__name__)


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
            before_revoke=lambda partitions: self.segment_jobs.before_revoke(partitions),
        )
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
        self.lease = Lease(settings, before_revoke=lambda: self.shared_job.before_lease_revoke())
        self._input_partitions = 0
        self._wire_jobs()
        self._compute_done = threading.Event()
        self._compute = threading.Thread(target=self._compute_loop, name="compute", daemon=True)
        self._signals = 0

    def _wire_jobs(self) -> None:
        """The compute thread's jobs. They read the models through `learner`, loaded by `run` (building a
        worker loads none), and the input topic's partition count, read by `start`."""
        s = self.settings

        def learner() -> Learner | None:
            return self.learner

        def partitions() -> int:
            return self._input_partitions

        self.scoring = Scoring(
            learner=learner,
            buffer=self.buffer,
            publisher=self.publisher,
            consumer=self.request_consumer,
            requests=self.requests,
            metrics=self.metrics,
            stats=self.stats,
        )
        self.outboxes = Outboxes(
            s,
            redis=self.redis,
            registry=self.registry,
            learner=learner,
            buffer=self.buffer,
            publisher=self.publisher,
            scoring=self.scoring,
            trigger=self.trigger,
            owned=self.ingestor.owned_partitions,
            lease_held=self.lease.held,
        )
        self.shared_job = SharedJob(
            s,
            redis=self.redis,
            buffer=self.buffer,
            learner=learner,
            lease_held=self.lease.held,
            partitions=partitions,
            outboxes=self.outboxes,
            metrics=self.metrics,
            stats=self.stats,
            stop=self.stop,
        )
        self.segment_jobs = SegmentJobs(
            s,
            buffer=self.buffer,
            registry=self.registry,
            trigger=self.trigger,
            epoch=self.ingestor.epoch,
            learner=learner,
            bootstrap_shared=self.shared_job.bootstrap,
            outboxes=self.outboxes,
            metrics=self.metrics,
            stats=self.stats,
            stop=self.stop,
        )
        self.housekeeping = Housekeeping(
            s,
            buffer=self.buffer,
            registry=self.registry,
            learner=learner,
            trigger=self.trigger,
            owned=self.ingestor.owned_partitions,
            epoch=self.ingestor.epoch,
            partitions=partitions,
            shared=self.shared_job,
            outboxes=self.outboxes,
            metrics=self.metrics,
        )

    # ---------------------------------------------------------------- main thread

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
                self.scoring.poll_requests()
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
        never ends here: `Scoring.answer` dead-letters one it cannot answer, so its requester learns."""
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
        """One turn, by priority: a waiting score request, else the periodic checks and then a due shared
        run, else one due segment training."""
        if self.scoring.answer_next():
            return
        self.housekeeping.tick()
        if self.shared_job.due():
            self.shared_job.run()
            return
        try:
            job = self.train_jobs.get(timeout=0.1)
        except queue.Empty:
            return
        self.segment_jobs.run(job)

    def trainings_pending(self) -> int:
        """Segments queued or training (until `Trigger.done`), plus 1 while a shared run is due or runs."""
        return len(self.trigger.queued()) + (1 if self.shared_job.pending() else 0)

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
