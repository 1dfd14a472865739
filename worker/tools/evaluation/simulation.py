"""The worker, simulated for the offline evaluation: the stream replayed in order through the worker's
own trainer (`train_shared` / `train_segment_adapter`), due rules (`stream.trigger`: a segment's and the
shared run's), buffer and pool bounds (`state.pool`) and serving choice (`learn.choice`), on one process
and without Kafka or Redis. What it calls each rule with is its own: events in stream order, one at a time,
where the worker reads counters every few seconds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.config import Settings
from worker.events import ClickEvent, ServingKind, ServingPrior
from worker.learn.adapters import SegmentAdapter
from worker.learn.backbone import Backbone
from worker.learn.choice import kept_from_shared, kept_on_zero_shot, resolve, standing
from worker.learn.click_model import ClickModel
from worker.learn.train import score_blend, score_segment, train_segment_adapter, train_shared
from worker.learn.training_data import segment_training_data, shared_training_data
from worker.ops.quality import HoldoutScore
from worker.state.pool import buffer_depth, segment_share
from worker.stream.trigger import enough_new_events, shared_due


@dataclass
class WorkerSim:
    """The worker's state while the stream replays: serving and training shared models, adapters, buffers.

    As in the worker (`Learner.adapter`), a shared promotion retires every adapter: each was gated on the
    old shared model, and a segment is served by the new one alone until its adapter is retrained on it.
    Versions count every run of the scope, promoted or not, as the registry numbers them; the runs' seeds
    are the worker's: a shared run's count (1 for the first), a segment run's buffer sequence number."""

    backbone: Backbone
    settings: Settings
    segments: set[str]
    shared_serving: ClickModel | None = None
    shared_train: ClickModel | None = None
    adapters: dict[str, SegmentAdapter] = field(default_factory=dict)
    seg_new: dict[str, list[ClickEvent]] = field(default_factory=dict)
    seg_sample: dict[str, list[ClickEvent]] = field(default_factory=dict)
    pool: list[ClickEvent] = field(default_factory=list)
    shared_new: list[ClickEvent] = field(default_factory=list)
    since_shared: int = 0
    observed: int = 0
    decisions: dict[str, dict[str, int]] = field(
        default_factory=lambda: {
            k: {"promoted": 0, "rejected": 0, "failed": 0} for k in ("shared", "segment")
        }
    )
    promoted_worse: int = 0
    segment_epochs: dict[str, int] = field(default_factory=dict)
    segment_runs: dict[str, int] = field(default_factory=dict)
    seg_seq: dict[str, int] = field(default_factory=dict)
    segment_versions: dict[str, int] = field(default_factory=dict)
    shared_version: int | None = None
    train_seconds: float = 0.0
    shared_log: list[dict[str, Any]] = field(default_factory=list)
    choices: dict[str, tuple[ServingKind, int | None]] = field(default_factory=dict)
    kept: dict[str, ServingKind] = field(default_factory=dict)
    prior: ServingPrior | None = None

    def serving(self, segment: str) -> ServingKind:
        """As the worker resolves it (`Learner.serving`)."""
        kind, on = self.choices.get(segment, (None, None))
        verdict = standing(self.kept.get(segment), on, self.shared_version)
        return resolve(kind, self.shared_serving is not None, segment in self.adapters, verdict)

    def observe(self, event: ClickEvent) -> None:
        s = self.settings
        self.observed += 1
        self.shared_new.append(event)
        self.since_shared += 1
        if event.segment in self.segments:
            self.seg_seq[event.segment] = self.seg_seq.get(event.segment, 0) + 1
            new = self.seg_new.setdefault(event.segment, [])
            new.append(event)
            del new[: max(0, len(new) - s.new_events_cap)]
            sample = self.seg_sample.setdefault(event.segment, [])
            sample.append(event)
            del sample[: max(0, len(sample) - s.sample_cap)]
            self._maybe_train_segment(event.segment)
        elif self.shared_serving is None:
            self._bootstrap_shared()
        if self.shared_serving is not None and shared_due(self.since_shared, True, s):
            self.train_shared_now()

    def _bootstrap_shared(self) -> None:
        """The worker's first-promotion rule (`shared_due` while no shared model serves): a due segment
        starts a shared run once `shared_bootstrap_min_events` new events are buffered. Other segments
        count as due at once (they are not tracked here; on a real stream some segment always is)."""
        if shared_due(self.since_shared, False, self.settings):
            self.train_shared_now()

    def _maybe_train_segment(self, segment: str) -> None:
        s = self.settings
        new = self.seg_new[segment]
        positives = sum(e.clicked for e in new)
        if not enough_new_events(len(new), positives, len(new) - positives, s):
            return
        if self.shared_serving is None:
            self._bootstrap_shared()
        if self.shared_serving is None:
            return
        older = [e for e in self.seg_sample[segment] if e.event_id not in {x.event_id for x in new}]
        data = segment_training_data(new, older, s, self.seg_seq[segment])
        result = train_segment_adapter(
            self.backbone,
            self.shared_serving,
            self.adapters.get(segment),
            data.new,
            data.replay,
            data.holdout,
            s,
            unseen=data.unseen,
            stop=data.stop,
            served=self.serving(segment),
            prior=self.prior,
        )
        self.train_seconds += result.train_seconds
        self.decisions["segment"][result.decision] += 1
        self.segment_runs[segment] = self.segment_runs.get(segment, 0) + 1
        key = str(result.kept_epoch)
        self.segment_epochs[key] = self.segment_epochs.get(key, 0) + 1
        if result.promoted and result.adapter is not None:
            self._check_not_worse(result.challenger, result.champion)
            self.adapters[segment] = result.adapter
            self.segment_versions[segment] = self.segment_runs[segment]
        if result.serving is not None and result.decision != "failed":
            self.choices[segment] = (result.serving.kind, self.shared_version)
        self.seg_new[segment] = []

    def _check_not_worse(self, challenger: HoldoutScore | None, champion: HoldoutScore | None) -> None:
        if challenger is None or champion is None:
            return
        worse_auc = (
            challenger.auc is not None and champion.auc is not None and challenger.auc < champion.auc - 1e-9
        )
        worse_loss = challenger.logloss > champion.logloss + self.settings.gate_logloss_margin + 1e-9
        if worse_auc or worse_loss:
            self.promoted_worse += 1

    def train_shared_now(self) -> None:
        s = self.settings
        if not self.shared_new:
            return
        run = sum(self.decisions["shared"].values()) + 1  # the worker's count, this run included
        buffered, new, older = pooled(self.pool, self.shared_new, s)
        data = shared_training_data(new, older, s, run)
        result = train_shared(
            self.backbone,
            self.shared_train,
            data.new,
            data.replay,
            data.holdout,
            s.model_copy(update={"seed": s.seed + run}),
            champion=self.shared_serving,
            counted=data.counted,
            unseen=data.unseen,
        )
        self.train_seconds += result.train_seconds
        self.decisions["shared"][result.decision] += 1
        self.shared_log.append(
            {
                "events": len(new) + len(older),
                "stream_position": self.observed,
                "decision": result.decision,
                "reason": result.reason,
                "held_back": {k: c.reason for k, c in kept_on_zero_shot(result.judged).items()},
                "serves": {k: c.reason for k, c in result.judged.items() if c.kind != "zero_shot"},
                "prior": None if result.prior is None else result.prior.model_dump(),
                "kept_epoch": result.kept_epoch,
                "history_events": (
                    None
                    if result.shared is None or result.shared.query_history is None
                    else result.shared.query_history.events
                ),
                "challenger": None if result.challenger is None else result.challenger.as_dict(),
                "champion": None if result.champion is None else result.champion.as_dict(),
            }
        )
        if result.shared is not None:
            self.shared_train = result.shared
        if result.promoted and result.shared is not None:
            self._check_not_worse(result.challenger, result.champion)
            self.shared_serving = result.shared
            self.shared_version = run
            self.kept = kept_from_shared({s: c.kind for s, c in result.judged.items()})
            self.prior = result.prior
            self.segment_versions.clear()
            self.adapters.clear()
        self.pool = buffered
        self.shared_new = []
        self.since_shared = 0

    def score(self, segment: str, pairs: Sequence[tuple[str | None, str]]) -> np.ndarray:
        kind = self.serving(segment)
        shared = None if kind == "zero_shot" else self.shared_serving
        adapter = self.adapters.get(segment) if kind == "adapter" else None
        int8 = self.settings.scoring_precision == "int8"
        probs = score_segment(self.backbone, shared, adapter, pairs, int8=int8)
        if kind == "blend":
            probs = score_blend(self.backbone, pairs, probs, self.settings.serving_blend_weight)
        return probs


def pooled(
    older: Sequence[ClickEvent], new: Sequence[ClickEvent], settings: Settings
) -> tuple[list[ClickEvent], list[ClickEvent], list[ClickEvent]]:
    """What a shared run of the worker pools (`state.pool.pool`), from the events its last run left
    buffered (`older`) and those since (`new`), in stream order: (what the buffers hold now, the run's
    new events, its older ones). Every segment gives its newest events, at most its share."""
    buffered = last_per_segment([*older, *new], buffer_depth(settings))
    sizes = list(Counter(e.segment for e in buffered).values())
    taken = {id(e) for e in last_per_segment(buffered, max(1, segment_share(sizes, settings)))}
    return buffered, [e for e in new if id(e) in taken], [e for e in older if id(e) in taken]


def last_per_segment(events: Sequence[ClickEvent], cap: int) -> list[ClickEvent]:
    """The last `cap` events of each segment, in stream order: what the worker's buffers hold."""
    left: dict[str, int] = {}
    kept: list[ClickEvent] = []
    for e in reversed(events):
        n = left.get(e.segment, cap)
        if n > 0:
            kept.append(e)
            left[e.segment] = n - 1
    kept.reverse()
    return kept
