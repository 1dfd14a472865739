"""Offline evaluation: replay a data set's stream through the worker's own trainer and compare procedures.

Procedures, each scored on `Dataset.holdout` (pairs never replayed) per evaluation segment:
- `worker`: the stream replayed in order through `train_shared` / `train_segment_adapter` as the worker
  runs them: a shared run every `shared_every` events (new events + `shared_replay_frac` replay, gated on
  pooled never-trained events), a segment run when its new events reach `min_new_events` (with
  `min_positives` / `min_negatives`), replay and a holdout slice from the segment's own past events.
  Served: zero-shot cosine until a shared model passes the gate, then shared + the segment's champion
  adapter. Adapters are trained for evaluation segments only; other segments' adapters cannot change
  these metrics (they feed the shared model through its own events either way).
- `zero_shot`: cosine of mean-pooled pretrained embeddings, through a fixed logistic (see model.py).
- `naive`: the pretrained encoder + fresh head fully fine-tuned on the segment's first k events only, the
  classic recipe of DATA.md: a plain cross-encoder, without the match features.
- `batch`: an offline model trained from scratch on every replayed event up to a checkpoint's stream
  position, with a query history counted from the same events (as the worker's shared model has). One
  model per distinct position (the segments' "end" is one model). To stay affordable, a position within
  `batch_spacing` of the last trained one below it uses that one (`batch_positions`); the result says
  per checkpoint on how many events its batch model trained. Spacing 1.0 is the exact procedure.

Checkpoints "0", "16", "64", "256": the number of the segment's labelled events seen so far in the
stream; "end": after the whole stream. A segment that never reaches k gets null there (left out of the mean).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.config import Settings, load_settings
from worker.events import ClickEvent, ServingKind
from worker.learn.choice import prior_gain, resolve
from worker.learn.history import QueryHistory
from worker.learn.model import Backbone, ClickModel, SegmentAdapter, load_backbone, new_click_model
from worker.learn.train import (
    FitOptions,
    fit,
    labels_of,
    pairs_of,
    sample_replay,
    score_segment,
    segment_training_data,
    shared_training_data,
    train_segment_adapter,
    train_shared,
)
from worker.ops.quality import HoldoutScore, holdout_score
from worker.stream.trigger import enough_new_events
from worker.tools.datasets import Dataset, load_dataset
from worker.tools.evalplot import plot_curve

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


def batch_positions(positions: Sequence[int], spacing: float) -> list[int]:
    """The stream positions at which a batch model is trained, ascending: every distinct checkpoint
    position above 0, except one at most `spacing` times the last kept one below it, which then uses that
    one (so a checkpoint's batch model lacks at most 1 - 1/spacing of its events); the last is always
    kept. Position 0 has nothing to train on: zero-shot stands for it."""
    if spacing < 1.0:
        raise ValueError(f"batch spacing must be at least 1.0, got {spacing}")
    distinct = sorted({p for p in positions if p > 0})
    kept: list[int] = []
    for i, p in enumerate(distinct):
        if not kept or p > kept[-1] * spacing or i == len(distinct) - 1:
            kept.append(p)
    return kept


def _checkpoint_positions(stream: Sequence[ClickEvent], segments: Sequence[str]) -> dict[str, dict[str, int]]:
    """Stream position (events processed) at which each segment's checkpoint is measured."""
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


class _Progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._progress is None:
            return lambda n: None
        task_id = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task_id, n)


@dataclass
class _WorkerSim:
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
    held_back: set[str] = field(default_factory=set)
    prior: float = 0.0

    def serving(self, segment: str) -> ServingKind:
        """As the worker resolves it (`Learner.serving`)."""
        kind, on = self.choices.get(segment, (None, None))
        held = segment in self.held_back and on != self.shared_version
        return resolve(kind, self.shared_serving is not None, segment in self.adapters, held)

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
        if self.since_shared >= s.shared_every:
            self.train_shared_now()

    def _bootstrap_shared(self) -> None:
        """The worker's first-promotion rule (`app.Worker._bootstrap_shared`): while no shared model
        serves, a due segment starts a shared run once `shared_bootstrap_min_events` are buffered, and
        after a rejected one only when as many more have come. Other segments count as due at once
        (they are not tracked here; on a real stream some segment always is)."""
        s = self.settings
        runs = sum(self.decisions["shared"].values())
        if runs > 0 and self.since_shared < s.shared_bootstrap_min_events:
            return
        if len(self.pool) + len(self.shared_new) < s.shared_bootstrap_min_events:
            return
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
        data = shared_training_data(self.shared_new, self.pool, s, run)
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
                "events": len(self.pool) + len(self.shared_new),
                "stream_position": self.observed,
                "decision": result.decision,
                "reason": result.reason,
                "held_back": {k: c.reason for k, c in result.held_back.items()},
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
            self.held_back = set(result.held_back)
            self.prior = prior_gain(
                None if result.challenger is None else result.challenger.auc,
                None if result.zero_shot is None else result.zero_shot.auc,
            )
            self.segment_versions.clear()
            self.adapters.clear()
        self.pool = _last_per_segment([*self.pool, *self.shared_new], s.sample_cap)
        self.shared_new = []
        self.since_shared = 0

    def score(self, segment: str, pairs: Sequence[tuple[str | None, str]]) -> np.ndarray:
        kind = self.serving(segment)
        shared = None if kind == "zero_shot" else self.shared_serving
        adapter = self.adapters.get(segment) if kind == "adapter" else None
        int8 = self.settings.scoring_precision == "int8"
        return score_segment(self.backbone, shared, adapter, pairs, int8=int8)


def _last_per_segment(events: Sequence[ClickEvent], cap: int) -> list[ClickEvent]:
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


def _metric_dict(m: HoldoutScore | None) -> dict[str, float | None] | None:
    if m is None:
        return None
    return {"auc": m.auc, "logloss": m.logloss if math.isfinite(m.logloss) else None}


def _mean(values: list[dict[str, float | None] | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("auc", "logloss"):
        xs = [float(v[key]) for v in values if v is not None and v.get(key) is not None]  # type: ignore[arg-type]
        out[key] = float(np.mean(xs)) if xs else None
    return out


def run_evaluation(
    dataset: Dataset,
    settings: Settings,
    quick: bool,
    progress: bool = True,
    plan: EvalPlan | None = None,
    on_phase: Callable[[dict[str, Any]], None] | None = None,
    procedures: Sequence[str] = PROCEDURES,
    stream_checkpoints: Sequence[int] = (),
) -> dict[str, Any]:
    """Replay the stream and measure `procedures` at every checkpoint; a JSON-ready dict.

    The worker and zero-shot always run (zero-shot costs one scoring pass); leaving out `batch` or
    `naive` saves their trainings, e.g. when comparing settings of the worker, and leaves them null.
    `on_phase` receives the result so far after each procedure's phase (with `"partial": PHASE`), so a
    run cut short still leaves what it measured. `stream_checkpoints` (events processed) adds `"stream"`:
    the worker on every segment at each position, in the live evaluation's shape; the last position of the
    stream is measured before the simulation's final shared run, as the live workers are.
    """
    unknown = set(procedures) - set(PROCEDURES)
    if unknown:
        raise ValueError(f"unknown procedures {sorted(unknown)}; choose from {', '.join(PROCEDURES)}")
    started = time.perf_counter()
    plan = plan or (quick_plan() if quick else full_plan())
    settings = settings.model_copy(update=plan.overrides)
    full_stream = dataset.stream()
    segments = _pick_segments(dataset, full_stream, plan.segments)
    if not segments:
        raise ValueError("the data set has no evaluation segments (no held-out pairs)")
    stream = _thin_stream(full_stream, segments, plan)
    holdout = {
        s: (
            sample_replay(dataset.holdout[s], plan.holdout_cap, settings.seed)
            if plan.holdout_cap
            else list(dataset.holdout[s])
        )
        for s in segments
    }
    labels = {s: labels_of(holdout[s]) for s in segments}
    pairs = {s: pairs_of(holdout[s]) for s in segments}
    positions = _checkpoint_positions(stream, segments)
    backbone = load_backbone(settings)
    results: dict[str, dict[str, dict[str, Any]]] = {s: {p: {} for p in PROCEDURES} for s in segments}

    def measure(segment: str, probs: np.ndarray) -> dict[str, float | None] | None:
        return _metric_dict(holdout_score(labels[segment], probs))

    zero_shot = {s: score_segment(backbone, None, None, pairs[s]) for s in segments}
    for s in segments:
        for name in CHECKPOINT_NAMES:
            reached = name in positions[s]
            results[s]["zero_shot"][name] = measure(s, zero_shot[s]) if reached else None

    by_position: dict[int, list[tuple[str, str]]] = {}
    for s in segments:
        for name in CHECKPOINT_NAMES:
            if name in positions[s]:
                by_position.setdefault(positions[s][name], []).append((s, name))

    sim = _WorkerSim(backbone, settings, set(segments))
    stream_at = sorted({int(n) for n in stream_checkpoints if 0 <= int(n) <= len(stream)})
    measured_stream: list[dict[str, Any]] = []

    def measure_stream(events: int) -> None:
        per: dict[str, dict[str, Any]] = {}
        for s in segments:
            m = measure(s, sim.score(s, pairs[s])) or {"auc": None, "logloss": None}
            per[s] = {
                **m,
                "segment_version": sim.segment_versions.get(s, 0),
                "served": sim.serving(s),
                "shared_version": sim.shared_version,
            }
        mean = _mean(list(per.values()))
        measured_stream.append(
            {"events": events, "mean_auc": mean["auc"], "mean_logloss": mean["logloss"], "per_segment": per}
        )

    seg_events: dict[str, list[ClickEvent]] = {s: [e for e in stream if e.segment == s] for s in segments}
    naive_ks = [k for k in CHECKPOINTS if k > 0]
    batch_trained_on: dict[str, dict[str, int]] = {s: {} for s in segments}

    def assemble(partial: str | None) -> dict[str, Any]:
        filled: dict[str, dict[str, Any]] = {
            s: {p: dict(results[s][p]) for p in PROCEDURES} for s in segments
        }
        for s in segments:
            for proc in PROCEDURES:
                for name in CHECKPOINT_NAMES:
                    filled[s][proc].setdefault(name, None)
            filled[s]["test_pairs"] = len(holdout[s])
            filled[s]["positives"] = int(labels[s].sum())
            filled[s]["served_at_end"] = sim.serving(s)
        mean = {
            proc: {name: _mean([filled[s][proc][name] for s in segments]) for name in CHECKPOINT_NAMES}
            for proc in PROCEDURES
        }
        return {
            **({} if partial is None else {"partial": partial}),
            **({"stream": list(measured_stream)} if stream_checkpoints else {}),
            "quick": quick,
            "segments": segments,
            "mean": mean,
            "per_segment": filled,
            "worker": {
                "decisions": sim.decisions,
                "promoted_worse_than_parent": sim.promoted_worse,
                "segment_kept_epochs": sim.segment_epochs,
                "adapters_serving_at_end": len(sim.adapters),
                "train_seconds": round(sim.train_seconds, 1),
                "shared_runs": sim.shared_log,
            },
            "stream_events": len(stream),
            "holdout_pairs": {s: len(holdout[s]) for s in segments},
            "checkpoint_positions": positions,
            "batch_trained_on": batch_trained_on,
            "pair_level_holdout": [s for s in segments if s in dataset.pair_level],
            "device": str(backbone.device),
            "settings": {
                k: getattr(settings, k)
                for k in (
                    "max_seq_len",
                    "batch_size",
                    "shared_batch_size",
                    "lora_rank",
                    "lora_alpha",
                    "adapter_lr",
                    "adapter_epochs",
                    "calibration_lr",
                    "match_features",
                    "match_lr",
                    "query_history",
                    "shared_lr",
                    "shared_epochs",
                    "shared_every",
                    "shared_replay_frac",
                    "shared_holdout_frac",
                    "replay_frac",
                    "holdout_frac",
                    "min_new_events",
                    "gate_logloss_margin",
                    "gate_z",
                    "gate_min_holdout",
                    "shared_min_holdout",
                    "unseen_query_frac",
                    "shared_holdout_cap",
                    "sample_cap",
                    "shared_bootstrap_min_events",
                    "early_stopping_patience",
                    "seed",
                )
            },
            "plan": {
                "batch_spacing": plan.batch_spacing,
                "batch_epochs": plan.batch_epochs,
                "naive_epochs": plan.naive_epochs,
                "naive_lr": plan.naive_lr,
            },
            "procedures": [p for p in PROCEDURES if p in procedures or p in ("worker", "zero_shot")],
            "notes": [
                *plan.notes,
                *dataset.notes,
                "zero_shot probability: sigmoid(10 * (cosine - 0.35)), fixed, not fitted",
                "batch: trained from scratch on the stream up to each checkpoint's position, one model per "
                f"distinct position, spacing {plan.batch_spacing:g} (batch_trained_on: its events)",
                "naive '0' is zero-shot; naive 'end' is trained on all of the segment's replayed events",
            ],
            "seconds": round(time.perf_counter() - started, 1),
        }

    def phase_done(name: str) -> None:
        if on_phase is not None:
            on_phase(assemble(name))

    with _Progress(progress) as bars:
        advance = bars.task("replay (worker)", len(stream))
        for i, event in enumerate(stream):
            if stream_at and stream_at[0] == i:
                measure_stream(stream_at.pop(0))
            for s, name in by_position.get(i, []):
                results[s]["worker"][name] = measure(s, sim.score(s, pairs[s]))
            if i in by_position:
                phase_done("replay")
            sim.observe(event)
            advance(1)
        if stream_at:
            measure_stream(stream_at.pop(0))
        sim.train_shared_now()
        for s, name in by_position.get(len(stream), []):
            results[s]["worker"][name] = measure(s, sim.score(s, pairs[s]))
        phase_done("worker")

        batch_segments = segments if "batch" in procedures else []
        trained_at = batch_positions(
            [pos for s in batch_segments for pos in positions[s].values()], plan.batch_spacing
        )
        due: dict[int, list[tuple[str, str]]] = {}
        for s in batch_segments:
            for name, pos in positions[s].items():
                j = bisect.bisect_right(trained_at, pos) - 1
                batch_trained_on[s][name] = 0 if j < 0 else trained_at[j]
                if j < 0:
                    results[s]["batch"][name] = measure(s, zero_shot[s])
                else:
                    due.setdefault(j, []).append((s, name))
        advance = bars.task("batch models", sum(trained_at[j] for j in due))
        batch_options = dataclasses.replace(FitOptions.for_shared(settings), epochs=plan.batch_epochs)
        for j in sorted(due):
            seen = stream[: trained_at[j]]
            model = new_click_model(backbone, settings.seed)
            if settings.query_history:
                model.query_history = QueryHistory.from_events(seen)
            fit(backbone, model, seen, batch_options)
            for s, name in due[j]:
                results[s]["batch"][name] = measure(s, score_segment(backbone, model, None, pairs[s]))
            del model
            advance(len(seen))
        phase_done("batch")

        plain = backbone.without_match_features()
        naive_options = FitOptions(
            lr=plan.naive_lr,
            epochs=plan.naive_epochs,
            batch_size=settings.batch_size,
            weight_decay=settings.weight_decay,
            seed=settings.seed,
        )
        naive_segments = segments if "naive" in procedures else []
        advance = bars.task("naive per-segment", len(naive_segments) * (len(naive_ks) + 1))
        for s in naive_segments:
            results[s]["naive"]["0"] = measure(s, zero_shot[s])
            sizes = {str(k): k for k in naive_ks if len(seg_events[s]) >= k}
            sizes["end"] = len(seg_events[s])
            for name in CHECKPOINT_NAMES[1:]:
                if name not in sizes:
                    results[s]["naive"][name] = None
                    advance(1)
                    continue
                same = [k for k in CHECKPOINT_NAMES[1:-1] if name == "end" and sizes.get(k) == sizes["end"]]
                if same:
                    results[s]["naive"][name] = results[s]["naive"][same[0]]
                    advance(1)
                    continue
                model = new_click_model(plain, settings.seed)
                fit(plain, model, seg_events[s][: sizes[name]], naive_options)
                results[s]["naive"][name] = measure(s, score_segment(plain, model, None, pairs[s]))
                advance(1)

    return assemble(None)


def _spacing(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 1.0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="homedepot",
        help="homedepot, hd-5k, hd-10k (Home Depot subsets), shop (the generated shop), "
        "a Home Depot .csv.gz or a .jsonl",
    )
    parser.add_argument("--holdout-frac", type=float, default=0.3, help="held-out query share (JSONL)")
    parser.add_argument("--quick", action="store_true", help="a CPU-sized subset (see the notes)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of mean AUC per checkpoint")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the JSON here (partial results after each phase)"
    )
    parser.add_argument(
        "--procedures",
        default=",".join(PROCEDURES),
        help="comma-separated; worker and zero_shot always run, batch and naive only if named",
    )
    parser.add_argument(
        "--batch-spacing",
        type=_spacing,
        default=None,
        help="batch: a checkpoint within this factor of the last trained position reuses that model "
        "(1.0: one model per distinct position, the exact procedure; default 1.5)",
    )
    parser.add_argument("--no-progress", action="store_true")
    live = parser.add_argument_group("live evaluation (worker/tools/live.py)")
    live.add_argument(
        "--live", action="store_true", help="measure real worker processes through Kafka and Redis"
    )
    live.add_argument("--workers", type=int, default=None, help="worker processes in one group (default 1)")
    live.add_argument("--limit", type=int, default=None, help="only the first N events of the slice")
    live.add_argument(
        "--checkpoint-every", type=int, default=None, help="events between checkpoints (quick: 128)"
    )
    live.add_argument(
        "--compare-offline", action="store_true", help="also run the offline simulation on the same slice"
    )


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mean holdout AUC / log loss over {len(result['segments'])} segments")
    table.add_column("procedure")
    for name in CHECKPOINT_NAMES:
        table.add_column(name, justify="right")
    for proc in PROCEDURES:
        cells = []
        for name in CHECKPOINT_NAMES:
            m = result["mean"][proc][name]
            auc = "-" if m["auc"] is None else f"{m['auc']:.3f}"
            ll = "-" if m["logloss"] is None else f"{m['logloss']:.3f}"
            cells.append(f"{auc} / {ll}")
        table.add_row(proc, *cells)
    Console().print(table)


def cli_main(args: argparse.Namespace, settings: Settings | None = None) -> int:
    live_only = [
        flag
        for flag, value in (
            ("--workers", getattr(args, "workers", None)),
            ("--limit", getattr(args, "limit", None)),
            ("--checkpoint-every", getattr(args, "checkpoint_every", None)),
            ("--compare-offline", getattr(args, "compare_offline", False) or None),
        )
        if value is not None
    ]
    if live_only and not getattr(args, "live", False):
        print(f"error: {', '.join(live_only)} only with --live", file=sys.stderr)
        return 2
    settings = settings or load_settings()
    dataset = load_dataset(args.data, holdout_frac=args.holdout_frac)
    if getattr(args, "live", False):
        from worker.tools import live

        return live.cli_main(args, settings, dataset)
    out: Path | None = args.out

    def write_partial(partial: dict[str, Any]) -> None:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(partial, default=str) + "\n")

    plan = quick_plan_for(dataset) if args.quick else full_plan()
    if args.batch_spacing is not None:
        plan = dataclasses.replace(plan, batch_spacing=args.batch_spacing)
    result = run_evaluation(
        dataset,
        settings,
        quick=args.quick,
        progress=not args.no_progress,
        plan=plan,
        on_phase=write_partial,
        procedures=[p.strip() for p in args.procedures.split(",") if p.strip()],
    )
    if args.plot is not None:
        plot_curve(result, args.plot)
    text = json.dumps(result, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        _print_table(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.tools.evaluate", description=__doc__)
    add_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
