"""Which segments are due for training, each queued exactly once until its training is done.

A segment is due when its new events number at least `min_new_events`, with at least `min_positives`
clicks and `min_negatives` non-clicks, and `train_cooldown_s` has passed since its last training.

"Queued" is remembered in memory, not in Redis, on purpose: the queue itself is in memory, so after a
restart (or when a partition moves to another worker) nothing is queued any more, and a Redis flag would
only block the segment forever. Instead, whenever partitions are assigned, every segment they hold is
checked again, so a segment that was due when the previous owner died is queued by the new one.

Threads: `observe`, `tick`, `assigned` and `revoked` run on the ingest thread; `done` and `still_owned` on
the training thread. One lock guards the state.

The rules themselves (`enough_new_events`, `cooldown_over`, and `shared_due` for the group's shared run)
need neither Redis nor Kafka, so the offline simulation of `worker.tools.evaluation` imports them from here
and replays the worker's own rules.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from worker.config import Settings

if TYPE_CHECKING:
    from worker.state.buffer import Buffer, SegmentState


@dataclass(frozen=True)
class DueSegment:
    """A training job: train `segment` (stored under input `partition`) on its new events up to `seq`."""

    partition: int
    segment: str
    seq: int
    new: int


def is_due(state: SegmentState, settings: Settings, now_s: float) -> bool:
    """Thresholds and cooldown, nothing else: a pure function so the rule is testable on its own."""
    return meets_thresholds(state, settings) and cooldown_over(state, settings, now_s)


def enough_new_events(new: int, positives: int, negatives: int, settings: Settings) -> bool:
    """The thresholds on a segment's untrained events, on plain counts: the simulation has no buffer."""
    return (
        new >= settings.min_new_events
        and positives >= settings.min_positives
        and negatives >= settings.min_negatives
    )


def shared_due(new_events: int, shared_serves: bool, settings: Settings) -> bool:
    """The group's shared run is due: `shared_every` new events in the whole group since the last run,
    or, while no shared model serves, `shared_bootstrap_min_events` (the first model comes early)."""
    need = settings.shared_every if shared_serves else settings.shared_bootstrap_min_events
    return new_events >= need


def meets_thresholds(state: SegmentState, settings: Settings) -> bool:
    return enough_new_events(state.new, state.new_pos, state.new_neg, settings)


def cooldown_over(state: SegmentState, settings: Settings, now_s: float) -> bool:
    return state.last_trained_ms == 0 or now_s - state.last_trained_ms / 1000 >= settings.train_cooldown_s


class Trigger:
    """Turns buffer states into training jobs on a bounded queue; `backlogged` tells ingest to pause."""

    def __init__(
        self,
        settings: Settings,
        jobs: queue.Queue[DueSegment],
        buffer: Buffer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.buffer = buffer
        self.clock = clock
        self._lock = threading.Lock()
        self._owned: set[int] = set()
        self._queued: set[tuple[int, str]] = set()
        self._pending: dict[tuple[int, str], DueSegment] = {}
        self._waiting: dict[tuple[int, str], SegmentState] = {}
        self._recheck: set[tuple[int, str]] = set()
        self._backoff: dict[tuple[int, str], float] = {}
        self._until_shared: set[tuple[int, str]] = set()
        self.queued_total = 0

    @property
    def backlogged(self) -> bool:
        """True while a due segment could not be put on the full queue."""
        with self._lock:
            return bool(self._pending)

    def queued(self) -> set[tuple[int, str]]:
        with self._lock:
            return set(self._queued)

    def observe(self, states: Iterable[SegmentState]) -> None:
        """Consider segments that just changed; due ones are queued (or held until the queue has room)."""
        now = self.clock()
        with self._lock:
            for state in states:
                self._consider(state, now)
            self._flush_pending()

    def tick(self) -> None:
        """Called every loop turn: retries a full queue, queues segments whose cooldown ran out."""
        now = self.clock()
        recheck: list[tuple[int, str]] = []
        with self._lock:
            for key, state in list(self._waiting.items()):
                if cooldown_over(state, self.settings, now) and self._backoff.get(key, 0.0) <= now:
                    del self._waiting[key]
                    self._consider(state, now)
            recheck, self._recheck = list(self._recheck), set()
            self._flush_pending()
        if recheck and self.buffer is not None:
            states = [self.buffer.segment_state(p, seg) for p, seg in recheck]
            self.observe(s for s in states if s is not None)

    def assigned(self, partitions: Iterable[int]) -> None:
        """New partitions: check every segment they hold (the queue of a previous owner is gone)."""
        parts = list(partitions)
        with self._lock:
            self._owned.update(parts)
        if self.buffer is not None:
            for p in parts:
                self.observe(self.buffer.segment_states(p))

    def revoked(self, partitions: Iterable[int]) -> None:
        """Forget everything about partitions this worker no longer owns."""
        parts = set(partitions)
        with self._lock:
            self._owned -= parts
            for store in (self._pending, self._waiting, self._backoff):
                for key in [k for k in store if k[0] in parts]:
                    del store[key]
            self._queued = {k for k in self._queued if k[0] not in parts}
            self._recheck = {k for k in self._recheck if k[0] not in parts}
            self._until_shared = {k for k in self._until_shared if k[0] not in parts}

    def forget(self, partition: int, segment: str) -> None:
        """An expired segment (`worker.state.retention`): not queued, waited on or retried any more, and a
        job for it already on the queue is skipped (`still_owned`)."""
        key = (partition, segment)
        with self._lock:
            for store in (self._pending, self._waiting, self._backoff):
                store.pop(key, None)
            for keys in (self._queued, self._recheck, self._until_shared):
                keys.discard(key)

    def still_owned(self, job: DueSegment) -> bool:
        """The trainer asks before it starts: no training for segments of partitions given away."""
        with self._lock:
            return job.partition in self._owned and (job.partition, job.segment) in self._queued

    def done(self, job: DueSegment, backoff_s: float = 0.0, until_shared: bool = False) -> None:
        """The trainer finished (or skipped or failed) `job`: the segment may be queued again, but not
        before `backoff_s` seconds when the run failed or could not start. A back-off `until_shared`
        (no shared model served yet) ends early, at the next `shared_serves`."""
        key = (job.partition, job.segment)
        with self._lock:
            self._queued.discard(key)
            if backoff_s > 0:
                self._backoff[key] = self.clock() + backoff_s
            else:
                self._backoff.pop(key, None)
            if until_shared and backoff_s > 0:
                self._until_shared.add(key)
            else:
                self._until_shared.discard(key)
            if job.partition in self._owned:
                self._recheck.add(key)

    def shared_serves(self) -> None:
        """A shared model serves now: segments that waited for one are due at the next `tick`, not when
        their back-off runs out, so no segment trains long after the model it waited for arrived."""
        with self._lock:
            for key in self._until_shared:
                self._backoff.pop(key, None)
            self._until_shared.clear()

    def _consider(self, state: SegmentState, now: float) -> None:
        key = (state.partition, state.segment)
        if key in self._queued or state.partition not in self._owned:
            return
        if not meets_thresholds(state, self.settings):
            self._waiting.pop(key, None)
            return
        if not cooldown_over(state, self.settings, now) or self._backoff.get(key, 0.0) > now:
            self._waiting[key] = state
            return
        self._waiting.pop(key, None)
        self._queued.add(key)
        self._pending[key] = DueSegment(state.partition, state.segment, state.seq, state.new)

    def _flush_pending(self) -> None:
        for key, job in list(self._pending.items()):
            try:
                self.jobs.put_nowait(job)
            except queue.Full:
                return
            del self._pending[key]
            self.queued_total += 1
