"""The compute side of the worker: the models it serves from and the trainings it records.

The data policy (`training_data.segment_training_data`, `training_data.shared_training_data`) is
shared with the offline evaluation, so what it measures is what the worker does. `Learner` holds the
shared model and an LRU of segment adapters, trains and gates through `worker.learn.train`, and records
a decision (`record`) only when its job says so.
It is owned by one thread (the worker's compute thread), so it takes no locks.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import structlog

from worker.config import Settings
from worker.events import ClickEvent, HoldoutMetrics, ServingChoice, ServingKind, ServingPrior
from worker.learn.adapters import SegmentAdapter
from worker.learn.backbone import Pair, load_backbone
from worker.learn.choice import (
    Choice,
    kept_on_zero_shot,
    prior_gain,
    recorded_verdicts,
    resolve_recorded,
)
from worker.learn.click_model import ClickModel
from worker.learn.encoder import base_model_path
from worker.learn.pinned import PinnedModels
from worker.learn.scoring import score_pairs
from worker.learn.serving import served_copy
from worker.learn.store import (
    SHARED_ENCODER,
    TMP_MARK,
    abandoned,
    load_adapter,
    load_shared,
    save_adapter,
    save_shared,
)
from worker.learn.train import TrainResult, score_blend, score_segment, train_segment_adapter, train_shared
from worker.learn.training_data import folds_of, pairs_of, segment_training_data, shared_training_data
from worker.ops.quality import HoldoutScore
from worker.state.registry import SHARED_SEGMENT, Registry, VersionRecord

log = structlog.get_logger(__name__)


def _wire_metrics(m: HoldoutScore | None) -> HoldoutMetrics | None:
    if m is None or m.n == 0:
        return None
    logloss = m.logloss if np.isfinite(m.logloss) else 1e9
    return HoldoutMetrics(auc=m.auc, logloss=logloss, n=m.n)


def _wire_choice(choice: Choice | None, shared_version: int) -> ServingChoice | None:
    """A serving choice as recorded, made on `shared_version`."""
    if choice is None:
        return None
    aucs: dict[str, float | None] = {str(k): v for k, v in choice.auc.items()}
    return ServingChoice(
        kind=choice.kind, shared_version=shared_version, n=choice.n, auc=aucs, reason=choice.reason
    )


def _wire_choices(choices: Mapping[str, Choice], shared_version: int) -> dict[str, ServingChoice]:
    return {s: c for s, choice in choices.items() if (c := _wire_choice(choice, shared_version))}


def clean_partial_dirs(store: Path) -> int:
    """Remove temp directories a killed process left behind (the registry never points at them), but
    not those another worker sharing the store is writing now (`store.abandoned`)."""
    removed = 0
    if not store.exists():
        return 0
    for parent, dirs, _ in os.walk(store):
        for name in list(dirs):
            if name.startswith(".") and TMP_MARK in name:
                dirs.remove(name)
                if not abandoned(Path(parent) / name):
                    continue
                shutil.rmtree(Path(parent) / name, ignore_errors=True)
                removed += 1
    return removed


SCORING_MODELS = 8
"""Served copies (shared + a segment's merged adapter, `served_copy`, int8 when it serves int8) kept for
scoring; each holds only the encoder's linear weights (about 42 MB at MiniLM-L6 in fp32, a quarter in
int8) and shares the rest with the shared model."""


class Serving(NamedTuple):
    """What scores a segment now: `version` is its adapter's (0: none), `shared_version` 0 for zero-shot;
    `pinned`: an operator's pin names it (`worker.state.pins`), not the automatic choice."""

    kind: ServingKind
    version: int
    shared_version: int
    pinned: bool = False


class Abandoned(RuntimeError):
    """A training whose result must not be recorded: its segment now belongs to another worker."""


class Candidate(NamedTuple):
    """A trained challenger with its gate decision, not recorded yet (`Learner.record` stores it)."""

    registry: Registry
    segment: str
    scope: Literal["segment", "shared"]
    result: TrainResult
    parent: int | None
    events: tuple[int, int]
    gated_against: int | None


class Learner:
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.shared_registry = registry.shared()
        self.backbone = load_backbone(settings)
        self.base_model = str(base_model_path(settings))
        self.shared: ClickModel | None = None
        self.shared_version = 0
        self.shared_dir: Path | None = None
        self._shared_next: ClickModel | None = None
        self._kept: dict[str, ServingKind] = {}
        self._adapters: OrderedDict[str, tuple[int, SegmentAdapter]] = OrderedDict()
        self._composed: OrderedDict[tuple[str, int, int], ClickModel] = OrderedDict()
        self._pinned = PinnedModels(self.backbone)
        clean_partial_dirs(settings.model_store)

    @property
    def device(self) -> str:
        return str(self.backbone.device)

    # Serving

    def refresh_shared(self) -> None:
        """Load the shared champion if the registry has a newer one (another worker may have promoted it)."""
        champion = self.shared_registry.champion(SHARED_SEGMENT)
        if champion is None or champion.version == self.shared_version or champion.adapter is None:
            return
        self.shared, _ = load_shared(Path(champion.adapter), self.backbone)
        self._serve_shared(self.shared, champion)
        self._shared_next = None
        log.info("shared model loaded", model_version=champion.version)

    def _serve_shared(self, model: ClickModel, record: VersionRecord) -> None:
        """A new shared champion: adapters gated on the old one stop being served (`adapter`), and the
        segments it does not clear for are held back (`choice.judge_promotion`)."""
        assert record.adapter is not None
        self.shared = model.eval()
        self.shared_version = record.version
        self.shared_dir = Path(record.adapter)
        self._kept = recorded_verdicts(record.serves, record.held_back)
        self._adapters.clear()

    def adapter(self, segment: str) -> tuple[int, SegmentAdapter | None]:
        """The segment's champion version and adapter (loaded lazily, kept in an LRU); 0 and None if none,
        or if the champion was gated on another shared version than the one serving now: an adapter is
        served only on the shared model it passed the gate with, until it is retrained on the new one."""
        version = self.registry.champion_version(segment)
        if version is None:
            self._adapters.pop(segment, None)
            return 0, None
        cached = self._adapters.get(segment)
        if cached is not None and cached[0] == version:
            self._adapters.move_to_end(segment)
            return cached
        record = self.registry.get(segment, version)
        if record is None or record.adapter is None or record.shared_version != self.shared_version:
            return 0, None
        adapter, _ = load_adapter(Path(record.adapter))
        self._adapters[segment] = (version, adapter)
        while len(self._adapters) > self.settings.max_resident_adapters:
            self._adapters.popitem(last=False)
        return version, adapter

    def resident_adapters(self) -> int:
        """Adapters held in memory now (at most `max_resident_adapters`)."""
        return len(self._adapters)

    def evict(self, segment: str) -> None:
        """Drop the segment's adapter from memory; the next `adapter(segment)` loads it from the store."""
        self._adapters.pop(segment, None)

    def prior(self) -> ServingPrior | None:
        """The prior of the segments' serving choices on the shared champion (`choice.judge_promotion`);
        a champion recorded before it was kept: its pooled AUC gain over zero-shot, the least spread."""
        champion = self.shared_registry.champion(SHARED_SEGMENT)
        if champion is None or champion.prior is not None:
            return None if champion is None else champion.prior
        if champion.challenger is None or champion.zero_shot is None:
            return None
        gain = prior_gain(champion.challenger.auc, champion.zero_shot.auc)
        return ServingPrior(gain=gain, sd=self.settings.serving_prior_sd)

    def serving(self, segment: str) -> Serving:
        """What serves the segment with the versions that score it: its pin, else `automatic`."""
        self.refresh_shared()
        pin = self.registry.pin(segment)
        if pin is not None:
            return Serving(pin.kind, pin.version, pin.shared_version, pinned=True)
        return self.automatic(segment)

    def automatic(self, segment: str) -> Serving:
        """What serves the segment unpinned (`choice.resolve_recorded`)."""
        choosing = self.shared is not None and self.settings.serving_choice
        choice = self.registry.serving(segment) if choosing else None
        version, adapter = self.adapter(segment) if self.shared is not None else (0, None)
        verdict = self._kept.get(segment) if choosing else None
        kind = resolve_recorded(choice, self.shared_version, adapter is not None, verdict)
        if kind == "zero_shot":
            return Serving(kind, 0, 0)
        return Serving(kind, version if kind == "adapter" else 0, self.shared_version)

    def score(
        self,
        segment: str,
        pairs: Sequence[Pair],
        folds: Sequence[int | None] | None = None,
        serving: Serving | None = None,
    ) -> tuple[np.ndarray, int]:
        """Probabilities and the adapter version that produced them (0: shared model or zero-shot), by
        what serves the segment (`serving`, read here when not given); `folds` when the pairs are events
        (`ClickModel.history_features`).

        Each (segment, champion, shared version) is merged into a served copy once (`_serving`), so
        scoring costs one forward pass per batch, not a LoRA injection per call."""
        served = self.serving(segment) if serving is None else serving
        if served.kind == "zero_shot" or (self.shared is None and not served.pinned):
            return score_segment(self.backbone, None, None, pairs), 0
        if served.pinned:
            model, version = self._pinned_model(segment, served), served.version
        else:
            version, adapter = self.adapter(segment) if served.kind == "adapter" else (0, None)
            model = self._serving(segment, version, adapter)
        probs = score_pairs(self.backbone, model, pairs, folds=folds)
        if served.kind == "blend":
            probs = score_blend(self.backbone, pairs, probs, self.settings.serving_blend_weight)
        return probs, version

    def score_events(self, segment: str, events: Sequence[ClickEvent]) -> tuple[np.ndarray, int]:
        """`score` for events, with their history folds: an event the shared model's query history
        counted is scored without its own label, as the gate scores its holdout."""
        return self.score(segment, pairs_of(events), folds_of(events))

    # Training

    def _record(
        self,
        registry: Registry,
        segment: str,
        result: TrainResult,
        parent: int | None,
        events: tuple[int, int],
        save: object | None,
        scope: Literal["segment", "shared"],
        gated_against: int | None,
    ) -> VersionRecord:
        """Reserve a version, save a promoted model, and store the decision fenced on the champion it
        was gated against (`Registry.record`); returns what was stored, a lost race as rejected."""
        version = registry.next_version(segment)
        decision, reason, adapter_dir = result.decision, result.reason, None
        if result.promoted and save is not None:
            target = registry.adapter_dir(segment, version)
            base = self.base_model
            if scope == "segment" and self.shared_dir is not None:
                base = str(self.shared_dir / SHARED_ENCODER)
            meta = {
                "segment": segment,
                "version": version,
                "base_model": base,
                "parent": parent,
                "match_features": self.backbone.match_features,
            }
            try:
                if isinstance(save, SegmentAdapter):
                    save_adapter(target, save, meta)
                else:
                    assert isinstance(save, ClickModel)
                    save_shared(target, save, meta)
                adapter_dir = str(target)
            except OSError as exc:
                decision, reason = "failed", f"model store: {exc}"
        rec = VersionRecord(
            scope=scope,
            segment=segment,
            version=version,
            parent_version=parent,
            decision=decision,
            reason=reason,
            base_model=self.base_model,
            events_from=events[0],
            events_to=events[1],
            challenger=_wire_metrics(result.challenger),
            champion=_wire_metrics(result.champion),
            device=result.device,
            train_seconds=round(result.train_seconds, 4),
            created_at=datetime.now(UTC),
            adapter=adapter_dir,
            shared_version=self.shared_version if scope == "segment" else None,
            serving=_wire_choice(result.serving, self.shared_version) if decision != "failed" else None,
            zero_shot=_wire_metrics(result.zero_shot),
            prior=result.prior,
            held_back=_wire_choices(kept_on_zero_shot(result.judged), version),
            serves=_wire_choices({s: c for s, c in result.judged.items() if c.kind != "zero_shot"}, version),
        )
        return registry.record(rec, gated_against=gated_against)

    def train_segment(
        self,
        segment: str,
        new: Sequence[ClickEvent],
        older: Sequence[ClickEvent],
        seq: tuple[int, int],
    ) -> Candidate | None:
        """One incremental fine-tune of the segment's adapter, gated against its champion; None when no
        shared model serves yet. Records nothing: `record` does."""
        self.refresh_shared()
        if self.shared is None:
            return None
        data = segment_training_data(new, older, self.settings, seq[1])
        pointer = self.registry.champion_version(segment)
        parent, champion = self.adapter(segment)
        result = train_segment_adapter(
            self.backbone,
            self.shared,
            champion,
            data.new,
            data.replay,
            data.holdout,
            self.settings,
            unseen=data.unseen,
            stop=data.stop,
            served=self.automatic(segment).kind,
            prior=self.prior(),
        )
        return Candidate(self.registry, segment, "segment", result, parent or None, seq, pointer)

    def train_shared(
        self,
        new: Sequence[ClickEvent],
        older: Sequence[ClickEvent],
        events: tuple[int, int],
    ) -> Candidate:
        """One shared run, continued from the last challenger (or champion), gated against the champion.
        Records nothing: `record` does.

        The run's number (which seeds its replay sample and its training) is its place in the group's
        sequence of shared runs, read from the registry, so it does not start again at 1 when the lease
        moves to another worker or the trainer restarts; the offline simulation numbers its runs alike."""
        self.refresh_shared()
        run = self.shared_registry.reserved(SHARED_SEGMENT) + 1
        data = shared_training_data(new, older, self.settings, run)
        start = self._shared_next if self._shared_next is not None else self.shared
        result = train_shared(
            self.backbone,
            start,
            data.new,
            data.replay,
            data.holdout,
            self.settings.model_copy(update={"seed": self.settings.seed + run}),
            champion=self.shared,
            counted=data.counted,
            unseen=data.unseen,
        )
        parent = self.shared_version or None
        return Candidate(self.shared_registry, SHARED_SEGMENT, "shared", result, parent, events, parent)

    def record(self, candidate: Candidate, still_owned: Callable[[], bool] = lambda: True) -> VersionRecord:
        """Store a trained candidate: a promoted model is saved into the model store (renamed into place)
        before its decision is recorded in the registry, fenced on the champion it was gated against
        (`_record`), so the registry never points at an incomplete directory; then it serves here.

        Raises `Abandoned`, recording nothing, when `still_owned()` is false: the segment's partition was
        lost to another worker, which trains the same events from the same champion, or the group's
        shared-run lock expired (another trainer may have run meanwhile)."""
        c = candidate
        if not still_owned():
            if c.scope == "segment":
                raise Abandoned(f"{c.segment!r}: partition lost during training")
            raise Abandoned("shared run: the group's shared-run lock was lost during training")
        model = c.result.adapter if c.scope == "segment" else c.result.shared
        rec = self._record(
            c.registry, c.segment, c.result, c.parent, c.events, model, c.scope, c.gated_against
        )
        if c.scope == "segment":
            if rec.decision == "promoted" and c.result.adapter is not None:
                self._adapters[c.segment] = (rec.version, c.result.adapter)
            return rec
        if c.result.shared is not None:
            self._shared_next = c.result.shared
        if rec.decision == "promoted" and c.result.shared is not None and rec.adapter is not None:
            self._serve_shared(c.result.shared, rec)
        return rec

    def _pinned_model(self, segment: str, served: Serving) -> ClickModel:
        """The served copy of what a pin names, its shared version and adapter from the store when they
        are not the ones serving automatically (`learn.pinned`)."""
        shared = self.shared
        if shared is None or served.shared_version != self.shared_version:
            shared = self._pinned.shared(
                served.shared_version,
                lambda: self._stored(self.shared_registry, SHARED_SEGMENT, served.shared_version),
            )
        adapter = None
        if served.kind == "adapter":
            adapter = self._pinned.adapter(
                segment, served.version, lambda: self._stored(self.registry, segment, served.version)
            )
        return self._serving(segment, served.version, adapter, (served.shared_version, shared))

    @staticmethod
    def _stored(registry: Registry, segment: str, version: int) -> Path:
        record = registry.get(segment, version)
        if record is None or record.adapter is None or not Path(record.adapter).is_dir():
            raise FileNotFoundError(f"pinned version {version} of {segment!r} is not in the model store")
        return Path(record.adapter)

    def _serving(
        self,
        segment: str,
        version: int,
        adapter: SegmentAdapter | None,
        on: tuple[int, ClickModel] | None = None,
    ) -> ClickModel:
        """The served copy for the segment's champion on the current shared model (or on `on`, a pinned
        shared version and its model), from the last `SCORING_MODELS` (copies made for a shared model
        no longer held go first: they hold its tensors)."""
        shared_version, shared = on if on is not None else (self.shared_version, self.shared)
        assert shared is not None
        key = (segment if adapter is not None else "", version, shared_version)
        model = self._composed.get(key)
        if model is not None:
            self._composed.move_to_end(key)
            return model
        held = {self.shared_version, *self._pinned.shared_versions()}
        for stale in [k for k in self._composed if k[2] not in held]:
            del self._composed[stale]
        model = served_copy(shared, adapter, self.settings.scoring_precision == "int8")
        if model is not shared:
            self._composed[key] = model
            while len(self._composed) > SCORING_MODELS:
                self._composed.popitem(last=False)
        return model
