"""The shared run's pool against a real Redis (issue #38, item 1): bounded in all and per segment, small
segments kept whole, the same events as reading everything when the bounds do not bind, and a due count
that reads partitions, never segments."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_buffer import pending

from worker.config import Settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer, PartitionWrite
from worker.state.pool import fair_share, group_new, pool
from worker.tools.evaluation.simulation import pooled

pytestmark = pytest.mark.integration


@pytest.fixture
def s(settings: Settings) -> Iterator[Settings]:
    small = settings.model_copy(update={"new_events_cap": 8, "sample_cap": 32})
    yield small
    Buffer(small).purge()


def _fill(buffer: Buffer, sizes: dict[str, int], partition: int = 0, start: int = 0) -> int:
    """Write `sizes[name]` events to each segment, interleaved; returns the next offset."""
    events, offset = [], start
    for name, n in sizes.items():
        for _ in range(n):
            events.append(pending(offset, name, event_id=f"{name}-{offset}"))
            offset += 1
    buffer.write([PartitionWrite(buffer.topic, partition, offset, events)])
    return offset


def test_fair_share_keeps_small_segments_whole() -> None:
    assert fair_share([1, 5, 100, 100], 50) == 22
    assert sum(min(n, 22) for n in [1, 5, 100, 100]) == 50
    assert fair_share([3, 4], 100) == 4
    assert fair_share([], 10) == 0
    assert fair_share([10, 10, 10], 7) == 2


@pytest.mark.parametrize("n", [1, 5, 8, 9, 20, 31, 40])
def test_recent_is_the_tail_of_the_training_snapshot(s: Settings, n: int) -> None:
    buffer = Buffer(s)
    _fill(buffer, {"a": 30})
    buffer.mark_trained(0, "a", 25)
    snap = buffer.training_snapshot(0, "a")
    whole = [e.event_id for e in [*snap.sample_events, *snap.new_events]]
    events, seq_to = buffer.recent(0, "a", n)
    assert [e.event_id for e in events] == whole[-n:] and seq_to == snap.seq_to


def test_unbounded_pool_is_every_buffered_event_split_by_the_marks(s: Settings) -> None:
    buffer = Buffer(s)
    _fill(buffer, {"a": 3, "b": 12, "c": 40}, partition=0)
    _fill(buffer, {"d": 5}, partition=1)
    first = pool(buffer, 2, s)
    whole = {
        (p, seg): [e.event_id for e in [*x.sample_events, *x.new_events]]
        for p, seg in [(0, "a"), (0, "b"), (0, "c"), (1, "d")]
        for x in [buffer.training_snapshot(p, seg)]
    }
    assert sorted(e.event_id for e in first.new) == sorted(i for ids in whole.values() for i in ids)
    assert first.older == [] and first.partitions == [0, 1]
    buffer.mark_shared_seen(first.marks)
    _fill(buffer, {"b": 2}, partition=0, start=100)
    second = pool(buffer, 2, s)
    assert [e.event_id for e in second.new] == ["b-100", "b-101"] and second.partitions == [0]
    assert len(second.older) == len(first.new)  # "b" holds 14 of its sample cap of 32: none fell out


def _fill_events(buffer: Buffer, sizes: dict[str, int], start: int = 0) -> list[ClickEvent]:
    """`_fill`, returning the events written, in stream order."""
    events = [
        pending(start + i, name, event_id=f"{name}-{start + i}")
        for i, name in enumerate(name for name, n in sizes.items() for _ in range(n))
    ]
    buffer.write([PartitionWrite(buffer.topic, 0, start + len(events), events)])
    return [ClickEvent.model_validate_json(p.payload) for p in events]


def test_bounded_pool_keeps_small_segments_whole_and_cuts_large_ones_to_one_share(s: Settings) -> None:
    buffer = Buffer(s)
    _fill(buffer, {"a": 3, "b": 10, "c": 30})
    bounded = s.model_copy(update={"shared_pool_max_events": 30})
    got = pool(buffer, 1, bounded)
    by_segment: dict[str, list[str]] = {}
    for e in got.new:
        by_segment.setdefault(e.segment, []).append(e.event_id)
    share = fair_share([3, 10, 30], 30)
    assert share == 17
    assert {k: len(v) for k, v in by_segment.items()} == {"a": 3, "b": 10, "c": share}
    assert by_segment["c"] == [e.event_id for e in buffer.recent(0, "c", share)[0]]  # the newest
    assert got.marks == {(0, buffer.segment_hash(x)): n for x, n in [("a", 3), ("b", 10), ("c", 30)]}
    capped = pool(buffer, 1, s.model_copy(update={"shared_pool_segment_cap": 4}))
    assert len(capped.new) == 3 + 4 + 4


@pytest.mark.parametrize(
    "bounds", [{}, {"shared_pool_max_events": 30}, {"shared_pool_segment_cap": 4}], ids=str
)
def test_the_offline_simulation_pools_what_the_worker_pools(s: Settings, bounds: dict[str, int]) -> None:
    """`eval`'s simulated worker takes the same events for a shared run as the worker's pool, before
    and after a run's marks, with and without bounds that bind: one rule, not a copy of it."""
    bounded = s.model_copy(update=bounds)
    buffer = Buffer(s)
    before = _fill_events(buffer, {"a": 3, "b": 10, "c": 30})
    first = pool(buffer, 1, bounded)
    buffer.mark_shared_seen(first.marks)
    since = _fill_events(buffer, {"a": 2, "c": 5}, start=len(before))
    second = pool(buffer, 1, bounded)

    def ids(events: list[ClickEvent]) -> set[str]:
        return {e.event_id for e in events}

    held, new, older = pooled([], before, bounded)
    assert (ids(new), ids(older)) == (ids(first.new), ids(first.older))
    _, new, older = pooled(held, since, bounded)
    assert (ids(new), ids(older)) == (ids(second.new), ids(second.older))
    assert second.new and second.older


def test_many_segments_never_pool_more_than_the_bound(s: Settings) -> None:
    buffer = Buffer(s)
    _fill(buffer, {f"seg-{i}": 1 + i % 25 for i in range(200)})
    got = pool(buffer, 1, s.model_copy(update={"shared_pool_max_events": 500}))
    assert len(got.new) + len(got.older) <= 500
    share = fair_share([1 + i % 25 for i in range(200)], 500)
    counts: dict[str, int] = {}
    for e in got.new:
        counts[e.segment] = counts.get(e.segment, 0) + 1
    assert all(counts[f"seg-{i}"] == min(1 + i % 25, share) for i in range(200))


def test_group_new_reads_counters_not_segments(s: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = Buffer(s)
    _fill(buffer, {"a": 7, "b": 5}, partition=0)
    _fill(buffer, {"c": 4}, partition=2)

    def no_scan(partition: int) -> None:
        raise AssertionError("group_new read segments")

    with monkeypatch.context() as m:
        m.setattr(buffer, "segment_states", no_scan)
        m.setattr(buffer, "segments", no_scan)
        assert group_new(buffer, 3) == 16
    got = pool(buffer, 3, s)
    buffer.mark_shared_counted(got.counters)
    buffer.mark_shared_seen(got.marks)
    assert group_new(buffer, 3) == 0
    _fill(buffer, {"a": 2}, partition=0, start=50)
    assert group_new(buffer, 3) == 2
    assert buffer.mark_shared_counted({0: 1}) == 0  # an older run's counters never move it back
    assert group_new(buffer, 3) == 2


def test_more_segments_than_the_bound_pool_one_event_each_from_a_subset_and_keep_the_rest_new(
    s: Settings,
) -> None:
    """At 10,000 segments and a bound of 2,000 events the share rounded to zero and a run pooled nothing:
    now as many segments as the bound give their newest event, the others stay new for later runs."""
    buffer = Buffer(s)
    _fill(buffer, {f"seg-{i}": 3 for i in range(120)})
    bound = s.model_copy(update={"shared_pool_max_events": 40})
    got = pool(buffer, 1, bound)
    assert len(got.new) == 40 and len({e.segment for e in got.new}) == 40
    assert got.older == [] and len(got.marks) == 40
    buffer.mark_shared_seen(got.marks)
    buffer.mark_shared_counted(got.counters)
    _fill(buffer, {"late": 1}, start=1000)
    again = pool(buffer, 1, bound)
    taken = {e.segment for e in got.new}
    fresh = {e.segment for e in again.new}
    assert len(again.new) <= 40 and fresh - taken, "segments left out before are drawn now"
    assert all(e.segment not in taken for e in again.new), "a taken segment has nothing new"
