"""What an evaluation replays: the plan (how much of the data set, the reference procedures' knobs), the
slice it cuts from the data set (segments, stream, held-out pairs) and where it measures.

The offline and the live evaluation cut the same slice from the same plan, so `--compare-offline` runs
the simulation on exactly the events the live workers took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.events import ClickEvent
from worker.learn.training_data import sample_replay
from worker.tools.datasets import Dataset

CHECKPOINTS = (0, 16, 64, 256)
CHECKPOINT_NAMES = (*(str(k) for k in CHECKPOINTS), "end")
PROCEDURES = ("worker", "zero_shot", "naive", "batch")


@dataclass(frozen=True)
class EvalPlan:
    """How much of the data set to replay, and the knobs of the reference procedures."""

    segments: int | None = None
    segment_cap: int | None = None
    other_events: int | None = None
    holdout_cap: int | None = None
    batch_spacing: float = 1.5
    batch_epochs: int = 1
    naive_epochs: int = 3
    naive_lr: float = 3e-5
    overrides: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def full_plan() -> EvalPlan:
    return EvalPlan(notes=("full run: every evaluation segment, the whole stream; meant for a GPU",))


def quick_plan() -> EvalPlan:
    """Fits a 2-core CPU in under 15 minutes; a smoke test of the procedure, not of quality."""
    return EvalPlan(
        segments=3,
        segment_cap=256,
        other_events=600,
        holdout_cap=64,
        naive_epochs=2,
        overrides={
            "shared_every": 400,
            "shared_holdout_cap": 256,
            "shared_holdout_frac": 0.1,
            "shared_lr": 1e-4,
        },
        notes=(
            "quick: the 3 evaluation segments with most events, their first 256 stream events each, "
            "600 other events (evenly thinned), at most 64 held-out pairs per segment",
            "quick: shared run every 400 events at lr 1e-4, 10 % of events held out for the shared gate; "
            "naive 2 epochs; the shared gate needs shared_min_holdout pooled pairs, "
            "which this slice reaches only late, so zero-shot serves most checkpoints; figures are not "
            "comparable with the full run",
        ),
    )


SMALL_SHOP_EVENTS = 10_000
"""A stream this small is replayed whole by `--quick` too: every small shop (hd-5k, hd-10k, shop) fits a
working session on 2 CPU cores that way, and a thinner slice is too small for the shared gate to judge."""


def quick_plan_for(dataset: Dataset) -> EvalPlan:
    """`--quick`: a small shop whole (`SMALL_SHOP_EVENTS`), a large one's `quick_plan` slice."""
    events = len(dataset.stream())
    if events > SMALL_SHOP_EVENTS:
        return quick_plan()
    note = f"quick on a small shop ({events:,} stream events <= {SMALL_SHOP_EVENTS:,}): the whole shop"
    return dataclasses.replace(full_plan(), notes=(note,))


@dataclass(frozen=True)
class EvalSlice:
    """The events a run replays, in order, and the held-out pairs it scores."""

    segments: list[str]
    stream: list[ClickEvent]
    holdout: dict[str, list[ClickEvent]]

    def digest(self) -> str:
        """A fingerprint of the held-out pair set: a rerun with the same data and seed gives the same."""
        h = hashlib.sha256()
        for segment in self.segments:
            h.update(segment.encode("utf-8", "surrogatepass") + b"\0")
            for event_id in sorted(e.event_id for e in self.holdout[segment]):
                h.update(event_id.encode() + b"\0")
        return h.hexdigest()

    def labelled(self, segment: str, events: int) -> int:
        return sum(1 for e in self.stream[:events] if e.segment == segment)

    def as_dataset(self) -> Dataset:
        """The slice as a data set of its own, for the offline simulation: same stream, same pairs."""
        held = [e for s in self.segments for e in self.holdout[s]]
        return Dataset(
            events=[*self.stream, *held], holdout={s: list(self.holdout[s]) for s in self.segments}
        )


def eval_slice(dataset: Dataset, plan: EvalPlan, seed: int, limit: int | None = None) -> EvalSlice:
    """`dataset` under `plan` (segments, thinning, held-out cap), cut to its first `limit` events."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    full = dataset.stream()
    segments = _pick_segments(dataset, full, plan.segments)
    if not segments:
        raise ValueError("the data set has no evaluation segments (no held-out pairs)")
    stream = _thin_stream(full, segments, plan)
    if limit is not None:
        stream = stream[:limit]
    holdout = {
        s: (
            sample_replay(dataset.holdout[s], plan.holdout_cap, seed)
            if plan.holdout_cap
            else list(dataset.holdout[s])
        )
        for s in segments
    }
    return EvalSlice(segments, stream, holdout)


def _pick_segments(dataset: Dataset, stream: Sequence[ClickEvent], limit: int | None) -> list[str]:
    segments = dataset.eval_segments
    if limit is None or limit >= len(segments):
        return segments
    counts = {s: 0 for s in segments}
    for e in stream:
        if e.segment in counts:
            counts[e.segment] += 1
    return sorted(sorted(segments, key=lambda s: (-counts[s], s))[:limit])


def _thin_stream(stream: Sequence[ClickEvent], segments: Sequence[str], plan: EvalPlan) -> list[ClickEvent]:
    wanted = set(segments)
    n_other = sum(1 for e in stream if e.segment not in wanted)
    every = 1 if plan.other_events is None else max(1, math.ceil(n_other / max(1, plan.other_events)))
    kept: list[ClickEvent] = []
    per_segment: dict[str, int] = {}
    other_index = 0
    for e in stream:
        if e.segment in wanted:
            seen = per_segment.get(e.segment, 0)
            if plan.segment_cap is None or seen < plan.segment_cap:
                kept.append(e)
            per_segment[e.segment] = seen + 1
        else:
            if other_index % every == 0 and (
                plan.other_events is None or other_index // every < plan.other_events
            ):
                kept.append(e)
            other_index += 1
    return kept


def segment_checkpoints(stream: Sequence[ClickEvent], segments: Sequence[str]) -> dict[str, dict[str, int]]:
    """Stream position (events processed) at which each segment's checkpoint is measured: "0", "16", ...
    when the segment's labelled events seen so far reach it, "end" after the whole stream."""
    positions: dict[str, dict[str, int]] = {s: {} for s in segments}
    counts = dict.fromkeys(segments, 0)
    for i, e in enumerate(stream):
        if e.segment not in positions:
            continue
        if counts[e.segment] == 0:
            positions[e.segment]["0"] = i
        counts[e.segment] += 1
        if counts[e.segment] in CHECKPOINTS:
            positions[e.segment][str(counts[e.segment])] = i + 1
    for s in segments:
        positions[s].setdefault("0", len(stream))
        positions[s]["end"] = len(stream)
    return positions


def checkpoint_positions(events: int, every: int) -> list[int]:
    """Stream checkpoints of the live run: 0 (before any event), every `every` events, and the end."""
    if every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1, got {every}")
    positions = list(range(0, events, every))
    return [*positions, events] if events > 0 else [0]
