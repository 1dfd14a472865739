"""What the registry recorded goes out: model-version events and the scores a champion's move changes.

Every job's last step. The registry keeps an outbox per segment (recorded versions above its published
pointer, and whether the champion moved); publishing reads it, sends, flushes, and only then moves the
pointer. So a crash, a failed delivery or a rebalance between a decision and its events costs a repeat,
never a loss: `drain` reads the outboxes again at start-up, for each newly owned partition and every
`OUTBOX_CHECK_S`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from worker.config import Settings
from worker.jobs import loaded
from worker.jobs.scoring import Scoring
from worker.learn.learner import Learner
from worker.state import pins
from worker.state.buffer import Buffer
from worker.state.client import RedisClient
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.stream.publish import Publisher, PublishError
from worker.stream.trigger import Trigger

log = structlog.get_logger(__name__)

OUTBOX_CHECK_S = 30.0
"""How often every owned partition's registry outbox is read (one pipelined round trip per partition)."""


class Outboxes:
    def __init__(
        self,
        settings: Settings,
        *,
        redis: RedisClient,
        registry: Registry,
        learner: Callable[[], Learner | None],
        buffer: Buffer,
        publisher: Publisher,
        scoring: Scoring,
        trigger: Trigger,
        owned: Callable[[], frozenset[int]],
        lease_held: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.registry = registry
        self._learner = learner
        self.buffer = buffer
        self.publisher = publisher
        self.scoring = scoring
        self.trigger = trigger
        self.owned = owned
        self.lease_held = lease_held
        self._checked = 0.0
        self._owned_before: frozenset[int] = frozenset()
        self._pins_seen = -1

    def publish(self, registry: Registry, segments: list[str], partition: int | None = None) -> None:
        """Publish each recorded version above a segment's published pointer (its model-version event)
        and, when its champion moved, the segment's refreshed scores; flush; then move the pointers.
        At least once: a crash before the pointer moves publishes them again, and consumers dedupe
        model-version events by (segment, version). A failed delivery is retried by `drain`.
        The shared model's scores are every partition's, refreshed by `refresh_stale_partitions`."""
        pending = registry.outboxes(segments)
        if not pending:
            return
        for box in pending:
            for rec in box.records:
                self.publisher.version(rec.event())
            if box.rescore and partition is not None:
                self.scoring.publish_scores(partition, box.segment)
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

    def refresh_stale_partitions(self) -> None:
        """A new shared champion (promoted here or by the group's trainer) changes what every segment
        is served by: refreshed scores for each owned partition's segments whose scores were published
        for another shared version. The marker is per partition in Redis, so a crash or a rebalance
        between a promotion and its scores publishes them from whoever owns the partition next."""
        learner = loaded(self._learner)
        learner.refresh_shared()
        version = learner.shared_version
        if not version:
            return
        self.trigger.shared_serves()
        for partition in sorted(self.owned()):
            if self.buffer.scores_shared_version(partition) == version:
                continue
            for segment in self.buffer.segments(partition):
                self.scoring.publish_scores(partition, segment)
            self.publisher.flush(self.settings.drain_grace_s)
            self.buffer.mark_scores_shared_version(partition, version)

    def notice_pins(self) -> None:
        """A pin or unpin (`models pin`) moved the group's counter: read every owned partition's outbox
        now rather than at the next `OUTBOX_CHECK_S`, so the pinned segment's model-version event and
        scores go out within seconds. A missed move costs only that wait: the outbox has them."""
        seen = pins.changes(self.redis, self.settings.redis_prefix)
        if seen != self._pins_seen:
            self._pins_seen = seen
            self._checked = time.monotonic() - OUTBOX_CHECK_S

    def drain(self) -> None:
        """Decisions recorded but not yet acknowledged by Kafka (a crash between the two, a failed
        delivery, a rollback): a newly owned partition's segments at the next housekeeping, which is
        also how start-up drains them, every owned one's each `OUTBOX_CHECK_S`. The shared model's are
        the lease holder's: it records them, and a crashed trainer's pass with the lease."""
        learner = loaded(self._learner)
        now = time.monotonic()
        owned = self.owned()
        due = owned - self._owned_before
        if now - self._checked >= OUTBOX_CHECK_S:
            self._checked, due = now, owned
            if self.lease_held():
                self.publish(learner.shared_registry, [SHARED_SEGMENT])
        self._owned_before = owned
        for partition in sorted(due):
            self.publish(self.registry, self.buffer.segments(partition), partition)
