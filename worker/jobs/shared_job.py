"""The group's shared run: one worker at a time (the lease holder, under a Redis lock) trains the shared
model on the events pooled from every partition, and owns the order of its steps (`SharedJob.run`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from worker.config import Settings
from worker.jobs import loaded
from worker.jobs.outboxes import Outboxes
from worker.jobs.stats import WorkerStats
from worker.learn.learner import Abandoned, Learner
from worker.ops.metrics import Metrics
from worker.state.buffer import Buffer
from worker.state.client import RedisClient
from worker.state.keys import shared_lock_key
from worker.state.lock import Lock
from worker.state.pool import Pool, group_new, pool
from worker.state.registry import SHARED_SEGMENT, VersionRecord
from worker.stream.trigger import shared_due

log = structlog.get_logger(__name__)

SHARED_CHECK_S = 2.0
"""How often the group's shared trainer counts the new events of every partition."""
SHARED_LOCK_TTL_S = 30.0
"""How long a shared run's lock outlives a holder that stopped renewing it (a crash, a stall)."""


class SharedJob:
    def __init__(
        self,
        settings: Settings,
        *,
        redis: RedisClient,
        buffer: Buffer,
        learner: Callable[[], Learner | None],
        lease_held: Callable[[], bool],
        partitions: Callable[[], int],
        outboxes: Outboxes,
        metrics: Metrics,
        stats: WorkerStats,
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self._learner = learner
        self.lease_held = lease_held
        self.partitions = partitions
        self.outboxes = outboxes
        self.metrics = metrics
        self.stats = stats
        self.stop = stop
        self.lock = Lock(
            redis, shared_lock_key(settings.redis_prefix, settings.input_topic), SHARED_LOCK_TTL_S
        )
        self.running = False
        self._group_new = 0
        self._group_checked = 0.0

    def before_lease_revoke(self) -> None:
        """Let a running shared training end before the lease moves, so the next holder starts from its
        result rather than being refused the shared-run lock (which is what keeps two runs apart once
        this wait is over; a drain has already waited out its share of the grace period)."""
        deadline = time.monotonic() + self.settings.drain_grace_s
        while self.running and not self.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)

    def due(self) -> bool:
        """This worker holds the group's lease and enough new events arrived in the whole group
        (`trigger.shared_due`, the rule the offline simulation replays). Reads only numbers the compute
        thread keeps (`count_group_new`), so a metrics scrape may call it."""
        if not self.lease_held():
            return False
        learner = self._learner()
        return shared_due(self._group_new, learner is not None and learner.shared is not None, self.settings)

    def pending(self) -> bool:
        """A shared run is due or runs. `running` is set before `run` resets the count and read after
        `due`, so a reader never sees neither."""
        return self.due() or self.running

    def count_group_new(self, force: bool = False) -> None:
        """New events in every partition of the input topic since the last shared run, at most every
        `SHARED_CHECK_S` (`worker.state.pool.group_new`: one read per partition)."""
        now = time.monotonic()
        if not self.lease_held() or (not force and now - self._group_checked < SHARED_CHECK_S):
            return
        self._group_checked = now
        self._group_new = group_new(self.buffer, self.partitions())

    def pool(self) -> Pool:
        """Every segment of every partition, owned here or not, within the pool's bounds
        (`worker.state.pool`)."""
        return pool(self.buffer, self.partitions(), self.settings)

    def run(self) -> VersionRecord | None:
        """One shared run of the group's trainer, its steps in this order:

        0. lock: the group's shared-run lock (`worker.state.lock`) is held from before the pooling until
           the events are marked, so a lease that moved while a run still trains elsewhere cannot start
           a second one. A run refused the lock is skipped and tried again after the next count.
        1. data: every partition's new and older events, pooled (`pool`).
        2. train + gate: `Learner.train_shared` continues from the last challenger and gates it against
           the champion; nothing is recorded yet.
        3. store + record: `Learner.record` saves the model into the store, then `Registry.record`
           stores the decision; unless the lock was lost meanwhile (`Abandoned`: nothing recorded).
        4. mark: what the run took as new is marked in Redis after its decision is recorded: a crash
           before that trains the same events again (nothing was recorded), never after. The lock goes.
        5. publish: the shared registry's outbox and, after a promotion, the refreshed scores of every
           owned partition (`Outboxes`).
        """
        learner = loaded(self._learner)
        if not self.lock.acquire():
            self._group_new = 0
            log.info("shared run skipped: another shared run holds the lock", holder=self.lock.holder())
            return None
        self.running = True
        try:
            pooled = self.pool()
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
                    candidate = learner.train_shared(new, older, (0, len(new)))
                    rec = learner.record(candidate, still_owned=self.lock.held)
                    run.decision = rec.decision
            except Abandoned as exc:
                log.warning("shared run abandoned: it outlived its lock", reason=str(exc))
                return None
            self.buffer.mark_shared_seen(pooled.marks)
            self.buffer.mark_shared_counted(pooled.counters)
        finally:
            self.running = False
            self.lock.release()
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
        self.outboxes.publish(learner.shared_registry, [SHARED_SEGMENT])
        if rec.decision == "promoted":
            self.outboxes.refresh_stale_partitions()
        return rec

    def bootstrap(self) -> bool:
        """A due segment while no shared model serves: the group's trainer runs the first shared run now
        if enough events are buffered group-wide; on any other worker the segment waits for it."""
        learner = loaded(self._learner)
        if learner.shared is not None or not self.lease_held():
            return False
        self.count_group_new(force=True)
        if not self.due():
            return False
        rec = self.run()
        return rec is not None and rec.decision == "promoted"
