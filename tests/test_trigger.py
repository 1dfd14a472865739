"""The trigger rule and its exactly-once queueing, without Redis."""

from __future__ import annotations

import queue

import pytest

from worker.config import Settings
from worker.state.buffer import SegmentState
from worker.stream.trigger import DueSegment, Trigger, enough_new_events, is_due, shared_due


@pytest.fixture
def cfg() -> Settings:
    return Settings(
        min_new_events=10, min_positives=2, min_negatives=3, train_cooldown_s=60, train_queue_size=2
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def state(
    seg: str = "s", new: int = 10, pos: int = 2, neg: int = 3, trained_s: float = 0, partition: int = 0
) -> SegmentState:
    return SegmentState(partition, seg, new, new, pos, neg, int(trained_s * 1000))


def test_rule_needs_counts_and_cooldown(cfg: Settings) -> None:
    now = 1_000_000.0
    assert is_due(state(), cfg, now)
    assert not is_due(state(new=9), cfg, now)
    assert not is_due(state(pos=1), cfg, now)
    assert not is_due(state(neg=2), cfg, now)
    assert not is_due(state(trained_s=now - 59), cfg, now)
    assert is_due(state(trained_s=now - 60), cfg, now)


def test_count_rule_on_plain_counts(cfg: Settings) -> None:
    """The rule the offline simulation replays: the same thresholds, on counts instead of a state."""
    assert enough_new_events(10, 2, 3, cfg)
    assert not enough_new_events(9, 2, 3, cfg)
    assert not enough_new_events(10, 1, 3, cfg)
    assert not enough_new_events(10, 2, 2, cfg)


def test_shared_run_is_due_early_until_a_shared_model_serves() -> None:
    """The one schedule of shared runs, read by the worker's group trainer and the offline simulation."""
    s = Settings(shared_every=2048, shared_bootstrap_min_events=256)
    assert not shared_due(255, False, s)
    assert shared_due(256, False, s)
    assert not shared_due(2047, True, s)
    assert shared_due(2048, True, s)


def test_due_segment_is_queued_once_until_done(cfg: Settings) -> None:
    jobs: queue.Queue[DueSegment] = queue.Queue(cfg.train_queue_size)
    t = Trigger(cfg, jobs, clock=Clock())
    t.assigned([0])
    t.observe([state()])
    t.observe([state(new=20)])
    assert jobs.qsize() == 1
    job = jobs.get_nowait()
    assert (job.partition, job.segment) == (0, "s") and t.still_owned(job)
    t.observe([state(new=30)])
    assert jobs.empty()
    t.done(job)
    t.observe([state(new=30)])
    assert jobs.qsize() == 1


def test_cooldown_queues_later_without_new_events(cfg: Settings) -> None:
    clock = Clock()
    jobs: queue.Queue[DueSegment] = queue.Queue(2)
    t = Trigger(cfg, jobs, clock=clock)
    t.assigned([0])
    t.observe([state(trained_s=clock.now - 30)])
    t.tick()
    assert jobs.empty()
    clock.now += 31
    t.tick()
    assert jobs.qsize() == 1


def test_a_wait_for_the_shared_model_ends_when_one_serves(cfg: Settings) -> None:
    """A failure's back-off runs its course; a wait for the shared model ends once one serves."""
    clock = Clock()
    jobs: queue.Queue[DueSegment] = queue.Queue(2)
    t = Trigger(cfg, jobs, clock=clock)
    t.assigned([0])
    t.observe([state("waits"), state("failed")])
    waits, failed = jobs.get_nowait(), jobs.get_nowait()
    t.done(waits, backoff_s=30, until_shared=True)
    t.done(failed, backoff_s=30)
    t.observe([state("waits"), state("failed")])
    t.tick()
    assert jobs.empty()
    t.shared_serves()
    t.tick()
    assert [j.segment for j in list(jobs.queue)] == ["waits"]
    clock.now += 30
    t.tick()
    assert sorted(j.segment for j in list(jobs.queue)) == ["failed", "waits"]


def test_full_queue_backlogs_then_drains(cfg: Settings) -> None:
    jobs: queue.Queue[DueSegment] = queue.Queue(2)
    t = Trigger(cfg, jobs, clock=Clock())
    t.assigned([0, 1])
    t.observe([state(f"s{i}", partition=i % 2) for i in range(4)])
    assert jobs.qsize() == 2 and t.backlogged
    jobs.get_nowait()
    t.tick()
    assert jobs.qsize() == 2 and t.backlogged
    jobs.get_nowait()
    t.tick()
    assert not t.backlogged
    assert t.queued_total == 4


def test_revoked_partitions_are_forgotten_and_not_trained(cfg: Settings) -> None:
    jobs: queue.Queue[DueSegment] = queue.Queue(1)
    t = Trigger(cfg, jobs, clock=Clock())
    t.assigned([0, 1])
    t.observe([state("a", partition=0), state("b", partition=1)])
    job = jobs.get_nowait()
    t.revoked([job.partition])
    assert not t.still_owned(job)
    t.tick()
    assert not t.backlogged or jobs.qsize() == 1
    t.observe([state("x", partition=job.partition)])
    assert all(j.partition != job.partition for j in list(jobs.queue))


def test_segments_of_unowned_partitions_are_ignored(cfg: Settings) -> None:
    jobs: queue.Queue[DueSegment] = queue.Queue(4)
    t = Trigger(cfg, jobs, clock=Clock())
    t.observe([state()])
    assert jobs.empty()
