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

import bisect
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.config import Settings
from worker.learn.backbone import Backbone, Pair, load_backbone
from worker.learn.click_model import new_click_model
from worker.learn.fit import FitOptions, fit
from worker.learn.history import QueryHistory
from worker.learn.train import score_segment
from worker.learn.training_data import labels_of, pairs_of
from worker.tools.datasets import Dataset
from worker.tools.evaluation.metrics import Metrics, holdout_metrics, mean
from worker.tools.evaluation.plan import (
    CHECKPOINT_NAMES,
    CHECKPOINTS,
    PROCEDURES,
    EvalPlan,
    eval_slice,
    full_plan,
    quick_plan,
    segment_checkpoints,
)
from worker.tools.evaluation.progress import ProgressBars
from worker.tools.evaluation.report import OfflineRun, offline_result
from worker.tools.evaluation.simulation import WorkerSim


@dataclass(frozen=True)
class _Holdout:
    """What every procedure is scored on: each segment's held-out pairs and labels, and zero-shot's
    scores of them (zero-shot also stands for a procedure that has nothing to train on yet)."""

    backbone: Backbone
    pairs: dict[str, list[Pair]]
    labels: dict[str, np.ndarray]
    zero_shot: dict[str, np.ndarray]

    def metrics(self, segment: str, probs: np.ndarray) -> Metrics:
        return holdout_metrics(self.labels[segment], probs)


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
    data = eval_slice(dataset, plan, settings.seed)
    backbone = load_backbone(settings)
    pairs = {s: pairs_of(data.holdout[s]) for s in data.segments}
    held = _Holdout(
        backbone=backbone,
        pairs=pairs,
        labels={s: labels_of(data.holdout[s]) for s in data.segments},
        zero_shot={s: score_segment(backbone, None, None, pairs[s]) for s in data.segments},
    )
    run = OfflineRun(
        dataset=dataset,
        settings=settings,
        plan=plan,
        quick=quick,
        procedures=procedures,
        data=data,
        labels=held.labels,
        positions=segment_checkpoints(data.stream, data.segments),
        sim=WorkerSim(backbone, settings, set(data.segments)),
        device=str(backbone.device),
        stream=[] if stream_checkpoints else None,
        started=started,
    )
    for s in data.segments:
        for name in CHECKPOINT_NAMES:
            reached = name in run.positions[s]
            run.cells[s]["zero_shot"][name] = held.metrics(s, held.zero_shot[s]) if reached else None

    def phase_done(name: str) -> None:
        if on_phase is not None:
            on_phase(offline_result(run, name))

    with ProgressBars(progress) as bars:
        _replay(run, held, stream_checkpoints, bars, phase_done)
        phase_done("worker")
        _batch(run, held, "batch" in procedures, bars)
        phase_done("batch")
        _naive(run, held, "naive" in procedures, bars)
    return offline_result(run, None)


def _replay(
    run: OfflineRun,
    held: _Holdout,
    stream_checkpoints: Sequence[int],
    bars: ProgressBars,
    phase_done: Callable[[str], None],
) -> None:
    """The `worker` procedure: the stream through the simulated worker, measured at each segment's
    checkpoints (and at `stream_checkpoints` on every segment), then the final shared run."""
    segments, stream, sim = run.data.segments, run.data.stream, run.sim
    by_position: dict[int, list[tuple[str, str]]] = {}
    for s in segments:
        for name in CHECKPOINT_NAMES:
            if name in run.positions[s]:
                by_position.setdefault(run.positions[s][name], []).append((s, name))
    stream_at = sorted({int(n) for n in stream_checkpoints if 0 <= int(n) <= len(stream)})
    measured = run.stream if run.stream is not None else []

    def measure(s: str) -> Metrics:
        return held.metrics(s, sim.score(s, held.pairs[s]))

    def measure_stream(events: int) -> None:
        per: dict[str, dict[str, Any]] = {}
        for s in segments:
            per[s] = {
                **measure(s),
                "segment_version": sim.segment_versions.get(s, 0),
                "served": sim.serving(s),
                "shared_version": sim.shared_version,
            }
        measured.append(
            {
                "events": events,
                "mean_auc": mean(m["auc"] for m in per.values()),
                "mean_logloss": mean(m["logloss"] for m in per.values()),
                "per_segment": per,
            }
        )

    advance = bars.task("replay (worker)", len(stream))
    for i, event in enumerate(stream):
        if stream_at and stream_at[0] == i:
            measure_stream(stream_at.pop(0))
        for s, name in by_position.get(i, []):
            run.cells[s]["worker"][name] = measure(s)
        if i in by_position:
            phase_done("replay")
        sim.observe(event)
        advance(1)
    if stream_at:
        measure_stream(stream_at.pop(0))
    sim.train_shared_now()
    for s, name in by_position.get(len(stream), []):
        run.cells[s]["worker"][name] = measure(s)


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


def _batch(run: OfflineRun, held: _Holdout, wanted: bool, bars: ProgressBars) -> None:
    """The `batch` procedure: a model from scratch on the stream up to each (spaced) checkpoint position."""
    settings, stream, backbone = run.settings, run.data.stream, held.backbone
    batch_segments = run.data.segments if wanted else []
    trained_at = batch_positions(
        [pos for s in batch_segments for pos in run.positions[s].values()], run.plan.batch_spacing
    )
    due: dict[int, list[tuple[str, str]]] = {}
    for s in batch_segments:
        for name, pos in run.positions[s].items():
            j = bisect.bisect_right(trained_at, pos) - 1
            run.batch_trained_on[s][name] = 0 if j < 0 else trained_at[j]
            if j < 0:
                run.cells[s]["batch"][name] = held.metrics(s, held.zero_shot[s])
            else:
                due.setdefault(j, []).append((s, name))
    advance = bars.task("batch models", sum(trained_at[j] for j in due))
    options = dataclasses.replace(FitOptions.for_shared(settings), epochs=run.plan.batch_epochs)
    for j in sorted(due):
        seen = stream[: trained_at[j]]
        model = new_click_model(backbone, settings.seed)
        if settings.query_history:
            model.query_history = QueryHistory.from_events(seen)
        fit(backbone, model, seen, options)
        for s, name in due[j]:
            probs = score_segment(backbone, model, None, held.pairs[s])
            run.cells[s]["batch"][name] = held.metrics(s, probs)
        del model
        advance(len(seen))


def _naive(run: OfflineRun, held: _Holdout, wanted: bool, bars: ProgressBars) -> None:
    """The `naive` procedure: a plain cross-encoder fine-tuned on the segment's first k events only."""
    settings = run.settings
    plain = held.backbone.without_match_features()
    options = FitOptions(
        lr=run.plan.naive_lr,
        epochs=run.plan.naive_epochs,
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
    )
    seg_events = {s: [e for e in run.data.stream if e.segment == s] for s in run.data.segments}
    naive_ks = [k for k in CHECKPOINTS if k > 0]
    naive_segments = run.data.segments if wanted else []
    advance = bars.task("naive per-segment", len(naive_segments) * (len(naive_ks) + 1))
    for s in naive_segments:
        cells = run.cells[s]["naive"]
        cells["0"] = held.metrics(s, held.zero_shot[s])
        sizes = {str(k): k for k in naive_ks if len(seg_events[s]) >= k}
        sizes["end"] = len(seg_events[s])
        for name in CHECKPOINT_NAMES[1:]:
            if name not in sizes:
                cells[name] = None
                advance(1)
                continue
            same = [k for k in CHECKPOINT_NAMES[1:-1] if name == "end" and sizes.get(k) == sizes["end"]]
            if same:
                cells[name] = cells[same[0]]
                advance(1)
                continue
            model = new_click_model(plain, settings.seed)
            fit(plain, model, seg_events[s][: sizes[name]], options)
            cells[name] = held.metrics(s, score_segment(plain, model, None, held.pairs[s]))
            advance(1)
