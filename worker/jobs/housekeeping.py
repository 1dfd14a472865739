"""The compute thread's periodic checks, between jobs: the group's new-event count, scores stale after a
shared promotion, pins, the registry's outboxes, and segments idle past their retention."""

from __future__ import annotations

import time
from collections.abc import Callable

from worker.config import Settings
from worker.jobs import loaded
from worker.jobs.outboxes import Outboxes
from worker.jobs.shared_job import SHARED_CHECK_S, SharedJob
from worker.learn.learner import Learner
from worker.ops.metrics import Metrics
from worker.state.buffer import Buffer
from worker.state.registry import Registry
from worker.state.retention import sweep as expire_idle_segments
from worker.stream.trigger import Trigger

EXPIRY_CHECK_S = 60.0
"""How often owned partitions are swept for segments idle longer than `segment_retention_s`."""


class Housekeeping:
    def __init__(
        self,
        settings: Settings,
        *,
        buffer: Buffer,
        registry: Registry,
        learner: Callable[[], Learner | None],
        trigger: Trigger,
        owned: Callable[[], frozenset[int]],
        epoch: Callable[[int], int | None],
        partitions: Callable[[], int],
        shared: SharedJob,
        outboxes: Outboxes,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.buffer = buffer
        self.registry = registry
        self._learner = learner
        self.trigger = trigger
        self.owned = owned
        self.epoch = epoch
        self.partitions = partitions
        self.shared = shared
        self.outboxes = outboxes
        self.metrics = metrics
        self._housekept = 0.0
        self._expiry_checked = 0.0

    def tick(self) -> None:
        """Every `SHARED_CHECK_S`; each check keeps its own, longer, period where it has one."""
        now = time.monotonic()
        if now - self._housekept < SHARED_CHECK_S:
            return
        self._housekept = now
        self.shared.count_group_new()
        self.outboxes.refresh_stale_partitions()
        self.outboxes.notice_pins()
        self.outboxes.drain()
        self.expire_idle()

    def expire_idle(self) -> None:
        """Each `EXPIRY_CHECK_S`: the owned partitions' segments idle past `segment_retention_s` go, in
        Redis, in the store and in memory (`worker.state.retention`)."""
        now = time.monotonic()
        if now - self._expiry_checked < EXPIRY_CHECK_S:
            return
        self._expiry_checked = now
        expired = expire_idle_segments(
            self.buffer,
            self.registry,
            self.owned(),
            self.settings.segment_retention_s,
            self._forget_segment,
            all_partitions=range(self.partitions()),
            epochs=self.epoch,
        )
        self.metrics.segments_expired.inc(len(expired))

    def _forget_segment(self, partition: int, segment: str) -> None:
        loaded(self._learner).evict(segment)
        self.trigger.forget(partition, segment)
        self.metrics.prequential.forget(segment)
