"""A due segment's training, from its buffered events to its published version: `SegmentJobs.train` is
the one place that owns the order of the steps, `SegmentJobs.run` what the outcome means for the next
attempt (its back-off)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum
from typing import Any

import structlog

from worker.config import Settings
from worker.jobs import loaded
from worker.jobs.outboxes import Outboxes
from worker.jobs.stats import WorkerStats
from worker.learn.learner import Abandoned, Learner
from worker.ops.metrics import Metrics
from worker.state.buffer import Buffer
from worker.state.registry import Registry
from worker.stream.trigger import DueSegment, Trigger

log = structlog.get_logger(__name__)


class Outcome(Enum):
    """How a segment job ended, which decides its back-off: it counted, it waits for a shared model, or
    it failed (backed off twice as long each time in a row)."""

    DONE = "done"
    WAIT = "wait"
    FAILED = "failed"


class SegmentJobs:
    """Runs the due segments' trainings, one at a time, on the compute thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        buffer: Buffer,
        registry: Registry,
        trigger: Trigger,
        epoch: Callable[[int], int | None],
        learner: Callable[[], Learner | None],
        bootstrap_shared: Callable[[], bool],
        outboxes: Outboxes,
        metrics: Metrics,
        stats: WorkerStats,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.registry = registry
        self.trigger = trigger
        self.epoch = epoch
        self._learner = learner
        self.bootstrap_shared = bootstrap_shared
        self.outboxes = outboxes
        self.metrics = metrics
        self.stats = stats
        self.stop = stop
        self._failures: dict[tuple[int, str], int] = {}
        self._training_partition: int | None = None
        self._training_done = threading.Event()
        self._training_done.set()

    def before_revoke(self, partitions: set[int]) -> None:
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

    def run(self, job: DueSegment) -> None:
        """Train, then hand the segment back to the trigger with the back-off its outcome earned."""
        bound = log.bind(segment=job.segment, partition=job.partition)
        outcome = Outcome.FAILED
        try:
            outcome = self.train(job, bound)
        except Exception:
            bound.exception("training job failed")
        finally:
            self._training_partition = None
            self._training_done.set()
            backoff = self._backoff_s(job, outcome)
            if backoff:
                bound.info("backing off", seconds=backoff)
            self.trigger.done(job, backoff_s=backoff, until_shared=outcome is Outcome.WAIT)

    def train(self, job: DueSegment, bound: Any) -> Outcome:
        """One segment's journey, data -> train -> gate -> store -> registry -> publish, in the order
        that keeps a crash at any point safe (it repeats work, never loses or half-writes it):

        1. data: the segment's new events since its last training, with an older sample
           (`Buffer.training_snapshot`), taken only while the partition is owned here, under the owner
           epoch that fences step 4. A shared model must serve first: the group's trainer bootstraps
           one, any other worker's segment waits (`Outcome.WAIT`).
        2. train + gate: `Learner.train_segment` fine-tunes the champion's adapter on them and gates the
           challenger against the champion; nothing is recorded yet.
        3. store + record: `Learner.record` renames a promoted adapter into the model store, then
           `Registry.record` stores the decision fenced on the champion it was gated against. A partition
           lost during the training records nothing (`Abandoned`): its next owner trains the same events.
        4. trim: `Buffer.mark_trained` drops the trained events under the step-1 epoch, only once the
           decision is recorded (a crash before it trains them again); a newer owner's events stay.
        5. publish: the registry's outbox, the model-version event and, when the champion moved, the
           segment's refreshed scores (`Outboxes.publish`); its pointer moves once Kafka acknowledged.
        """
        learner = loaded(self._learner)
        # 1. data
        epoch = self.epoch(job.partition)
        if not self.trigger.still_owned(job) or epoch is None:
            bound.info("skipping training: partition no longer owned")
            return Outcome.DONE
        snap = self.buffer.training_snapshot(job.partition, job.segment)
        if not snap.new_events:
            return Outcome.DONE
        seq = (snap.seq_from, snap.seq_to)
        bound.info("training", events=len(snap.new_events), seq_from=snap.seq_from, seq_to=snap.seq_to)
        learner.refresh_shared()
        if learner.shared is None and not self.bootstrap_shared():
            bound.info("no shared model serves yet: segment waits")
            return Outcome.WAIT
        self.metrics.score_before_learning(learner.score_events, snap.new_events)
        self._training_partition = job.partition
        self._training_done.clear()
        try:
            with self.metrics.training("segment") as run:
                # 2. train + gate
                candidate = learner.train_segment(job.segment, snap.new_events, snap.sample_events, seq)
                # 3. store + record
                rec = None
                if candidate is not None:
                    rec = learner.record(candidate, still_owned=lambda: self.trigger.still_owned(job))
                run.decision = rec.decision if rec is not None else "failed"
        except Abandoned as exc:
            bound.warning("training abandoned", reason=str(exc))
            return Outcome.DONE
        if rec is None:
            bound.info("no shared model serves yet: segment waits")
            return Outcome.WAIT
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
        # 4. trim
        trimmed = 0
        if rec.decision != "failed":
            trimmed = self.buffer.mark_trained(job.partition, job.segment, snap.seq_to, epoch=epoch)
        if trimmed < 0:
            bound.warning("partition owned elsewhere since the training began: nothing trimmed")
        # 5. publish
        self.outboxes.publish(self.registry, [job.segment], job.partition)
        return Outcome.FAILED if rec.decision == "failed" else Outcome.DONE

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
