"""Which events a training uses and for what: the rules that keep its three slices apart.

An event trains, picks a segment training's epoch (`is_early_stopping`), or judges the gate: held out by
event id (`is_holdout`) or of a query no model ever trains on (`is_unseen_query`). Every membership is a
hash, so an event stays in its slice in every run, and the early-stopping events never judge the gate,
whose win they would overstate. The worker (`learn.learner`) and the offline evaluation share these rules
through `segment_training_data` and `shared_training_data`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn.backbone import Pair
from worker.learn.history import fold_of, query_key


def pairs_of(events: Sequence[ClickEvent]) -> list[Pair]:
    return [(e.query or None, e.item_text) for e in events]


def folds_of(events: Sequence[ClickEvent]) -> list[int | None]:
    return [fold_of(e.event_id) for e in events]


def labels_of(events: Sequence[ClickEvent]) -> np.ndarray:
    return np.array([e.clicked for e in events], dtype=np.float64)


def is_holdout(event_id: str, frac: float) -> bool:
    """Stable membership: an event is in the holdout slice forever, so it is never trained on."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < frac


def is_unseen_query(query: str | None, frac: float) -> bool:
    """Stable membership of a query (as the query history keys it) in the slice no model trains on,
    so every gate can judge how a model does on queries it never saw. Events without a query never are."""
    key = query_key(query)
    if not key or frac <= 0:
        return False
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"unseen-query").digest()
    return int.from_bytes(digest, "big") / 2.0**64 < frac


def is_early_stopping(event_id: str, frac: float) -> bool:
    """Stable membership of a training event in the slice that picks a segment training's epoch: those
    pairs are never trained on and never judge the gate, whose win they would overstate."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8, person=b"early-stop").digest()
    return int.from_bytes(digest, "big") / 2.0**64 < frac


def split_holdout(events: Sequence[ClickEvent], frac: float) -> tuple[list[ClickEvent], list[ClickEvent]]:
    train = [e for e in events if not is_holdout(e.event_id, frac)]
    held = [e for e in events if is_holdout(e.event_id, frac)]
    return train, held


def sample_replay(events: Sequence[ClickEvent], n: int, seed: int) -> list[ClickEvent]:
    """A seeded uniform sample without replacement, kept in stream order."""
    if n >= len(events):
        return list(events)
    if n <= 0:
        return []
    idx = np.sort(np.random.default_rng(seed).choice(len(events), size=n, replace=False))
    return [events[int(i)] for i in idx]


@dataclass(frozen=True)
class TrainingData:
    """`holdout`: held-out events of seen queries; `unseen`: events of queries no model trains on (both
    judge the run). `counted`: the events the shared model's query history counts, seen holdout
    included (out-of-fold features keep each event's own label out of its own feature), unseen not."""

    new: list[ClickEvent]
    replay: list[ClickEvent]
    holdout: list[ClickEvent]
    unseen: list[ClickEvent] = field(default_factory=list)
    counted: list[ClickEvent] = field(default_factory=list)
    stop: list[ClickEvent] = field(default_factory=list)
    """A segment training's early-stopping events, apart from the gate's `holdout` and `unseen`."""


@dataclass(frozen=True)
class _Split:
    train_new: list[ClickEvent]
    train_old: list[ClickEvent]
    held: list[ClickEvent]
    unseen: list[ClickEvent]


def _split(new: Sequence[ClickEvent], older: Sequence[ClickEvent], frac: float, unseen_frac: float) -> _Split:
    """One rule for both levels: an unseen query's events are never trained on, and a held-out event id
    is held out in every run. Both memberships are hashes, so they never change between runs."""
    out = _Split([], [], [], [])
    for events, target in ((older, out.train_old), (new, out.train_new)):
        for e in events:
            if is_unseen_query(e.query, unseen_frac):
                out.unseen.append(e)
            elif is_holdout(e.event_id, frac):
                out.held.append(e)
            else:
                target.append(e)
    return out


def _event_id(event: ClickEvent) -> str:
    return event.event_id


def segment_training_data(
    new: Sequence[ClickEvent], older: Sequence[ClickEvent], settings: Settings, run: int
) -> TrainingData:
    """New events minus the segment's held-out ones, a replay sample of its older events, the two
    holdout slices (the segment's held-out events of seen queries, its events of unseen queries) and the
    early-stopping slice of its training events (`is_early_stopping`)."""
    split = _split(new, older, settings.holdout_frac, settings.unseen_query_frac)
    frac = settings.early_stopping_frac if settings.early_stopping_patience > 0 else 0.0
    stop = [e for e in (*split.train_old, *split.train_new) if is_early_stopping(e.event_id, frac)]
    stopping = {e.event_id for e in stop}
    train_new = [e for e in split.train_new if e.event_id not in stopping]
    train_old = [e for e in split.train_old if e.event_id not in stopping]
    replay = sample_replay(train_old, round(len(train_new) * settings.replay_frac), settings.seed + run)
    return TrainingData(train_new, replay, split.held, split.unseen, stop=stop)


def shared_training_data(
    new: Sequence[ClickEvent], older: Sequence[ClickEvent], settings: Settings, run: int
) -> TrainingData:
    """All segments' new events and a replay of older ones, minus the pooled holdout no model trains on:
    a sample of held-out events of seen queries and one of unseen queries' events, each capped.

    Both inputs are put in event-id order first: the shared trainer gathers them partition by partition,
    so without it the replay sample and the shuffled batches would depend on the partition layout and on
    which worker holds the lease, and would differ from the offline simulation's, which sees the stream
    in order."""
    new = sorted(new, key=_event_id)
    older = sorted(older, key=_event_id)
    split = _split(new, older, settings.shared_holdout_frac, settings.unseen_query_frac)
    replay = sample_replay(
        split.train_old, round(len(split.train_new) * settings.shared_replay_frac), settings.seed + run
    )
    cap = settings.shared_holdout_cap
    counted = [*split.train_old, *split.train_new, *split.held]
    return TrainingData(
        split.train_new,
        replay,
        sample_replay(split.held, cap, settings.seed),
        sample_replay(split.unseen, cap, settings.seed),
        counted,
    )
