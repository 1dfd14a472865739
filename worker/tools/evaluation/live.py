"""`python -m worker eval --live`: the quality of what running workers serve, measured through Kafka.

N real `python -m worker run` processes, one consumer group on topics and Redis keys of this run's own
(`run_settings.isolated`), take the data set's stream in order; held-out pairs are never produced. The replay
pauses at checkpoints (every K events of the slice, and at its end) until every worker has accounted for
every produced event (buffered, duplicate or dead-lettered) and has no training pending
(`ctr_worker_trainings_pending`, the queue, running trainings: all read from `/metrics`). Then every
evaluation segment's held-out pairs go out as score requests on `score-requests`, and the answers read
back from `scores` give the segment's AUC and log loss, and name the model that answered.

The slice, the held-out pairs and the settings overrides are the offline evaluation's (`plan`), so
`--compare-offline` runs the offline simulation (`offline`) on exactly these events.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn.backbone import load_backbone
from worker.learn.train import score_segment
from worker.learn.training_data import labels_of, pairs_of
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.stream.kafka import ensure_topics, make_producer
from worker.tools.datasets import Dataset
from worker.tools.evaluation.live_fleet import Fleet
from worker.tools.evaluation.live_scorer import Answer, Scorer
from worker.tools.evaluation.metrics import Metrics, fmt, holdout_metrics, mean
from worker.tools.evaluation.offline import run_evaluation
from worker.tools.evaluation.plan import (
    EvalPlan,
    EvalSlice,
    checkpoint_positions,
    eval_slice,
    full_plan,
    quick_plan,
)
from worker.tools.replay import produce_events
from worker.tools.run_settings import isolated

QUICK_OVERRIDES: dict[str, object] = {"max_seq_len": 32}
"""On top of the offline quick plan's overrides: what makes 1 worker fit 20 minutes on 2 CPU cores."""
QUICK_CHECKPOINT_EVERY = 128
FULL_CHECKPOINTS = 20
"""A full run without `--checkpoint-every` pauses about this many times."""
SETTING_KEYS = (
    "max_seq_len",
    "min_new_events",
    "train_cooldown_s",
    "shared_every",
    "shared_bootstrap_min_events",
    "shared_lr",
    "adapter_epochs",
    "new_events_cap",
    "sample_cap",
    "topic_partitions",
    "base_model",
    "seed",
)


def answered_by(segment_version: int, shared_version: int | None) -> str:
    """The model behind a score: the segment's adapter on a shared model, the shared model, or zero-shot."""
    if shared_version is None:
        return "zero-shot"
    if segment_version:
        return f"segment v{segment_version} on shared v{shared_version}"
    return f"shared v{shared_version}"


@dataclass(frozen=True)
class LiveOptions:
    """How many workers, how much of the slice, how often to measure, and how long to wait for what."""

    workers: int = 1
    limit: int | None = None
    checkpoint_every: int | None = None
    compare_offline: bool = False
    ready_timeout_s: float = 300.0
    idle_timeout_s: float = 3600.0
    answer_timeout_s: float = 600.0
    stop_timeout_s: float = 180.0


def live_settings(settings: Settings, plan: EvalPlan, quick: bool, run_id: str) -> Settings:
    """The user's settings, the plan's overrides (the offline run's), and no training cooldown unless
    `WORKER_TRAIN_COOLDOWN_S` is set: a checkpoint does not wait for one, the offline simulation has none."""
    overrides = {**plan.overrides, **(QUICK_OVERRIDES if quick else {})}
    if "train_cooldown_s" not in settings.model_fields_set:
        overrides["train_cooldown_s"] = 0.0
    return isolated(settings.model_copy(update=overrides), run_id)


def run_live(
    dataset: Dataset,
    settings: Settings,
    quick: bool,
    options: LiveOptions,
    say: Callable[[str], None] = lambda line: None,
    plan: EvalPlan | None = None,
) -> dict[str, Any]:
    """The live evaluation; a JSON-ready dict (see the module docstring and docs/learning.md)."""
    started = time.monotonic()
    plan = plan or (quick_plan() if quick else full_plan())
    run_id = f"live-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    ws = live_settings(settings, plan, quick, run_id)
    if options.workers < 1 or options.workers > ws.topic_partitions:
        raise ValueError(
            f"--workers must be 1..{ws.topic_partitions} (WORKER_TOPIC_PARTITIONS), got {options.workers}"
        )
    sl = eval_slice(dataset, plan, ws.seed, options.limit)
    n = len(sl.stream)
    every = options.checkpoint_every or (
        QUICK_CHECKPOINT_EVERY if quick else max(1, math.ceil(n / FULL_CHECKPOINTS))
    )
    positions = checkpoint_positions(n, every)
    shown = {k: str(getattr(ws, k)) for k in SETTING_KEYS}
    say(
        f"live evaluation {run_id}: {options.workers} worker(s), {len(sl.segments)} segments "
        f"{sl.segments}, {n} events, {sum(len(v) for v in sl.holdout.values())} held-out pairs, "
        f"checkpoints every {every} events ({len(positions)}); settings {shown}"
    )
    for note in plan.notes:
        say(f"  {note}")

    zero_shot = _zero_shot(ws, sl)
    zs_mean = mean(zero_shot[s]["auc"] for s in sl.segments)
    say(f"zero-shot mean AUC {zs_mean}")

    restamp = any(not _fresh(e, ws) for e in sl.stream)
    ensure_topics(ws, [ws.input_topic, ws.dlq_topic, ws.scores_topic, ws.versions_topic, ws.requests_topic])
    log_dir = ws.model_store.parent
    fleet = Fleet(ws, options.workers, log_dir)
    registry = Registry.from_settings(ws)
    shared_registry = registry.shared()
    checkpoints: list[dict[str, Any]] = []
    codes: list[int | None] = []
    dead = 0
    scorer: Scorer | None = None
    producer = make_producer(ws)
    try:
        fleet.start(options.ready_timeout_s)
        say(f"{options.workers} worker(s) ready; logs in {log_dir}")
        scorer = Scorer(ws, run_id)
        produced = 0
        for index, position in enumerate(positions):
            produced += (
                produce_events(ws, sl.stream[produced:position], restamp=restamp, producer=producer)
                if position > produced
                else 0
            )
            wait_started = time.monotonic()
            loads = fleet.wait_idle(position, options.idle_timeout_s)
            dead = sum(w.dead_lettered for w in loads)
            waited = time.monotonic() - wait_started
            shared_version = shared_registry.champion_version(SHARED_SEGMENT)
            answers = scorer.score(f"k{index}", sl.holdout, options.answer_timeout_s, fleet.check_alive)
            per_segment = {s: _answered(sl, s, position, answers[s], shared_version) for s in sl.segments}
            mean_auc = mean(v["auc"] for v in per_segment.values())
            mean_ll = mean(v["logloss"] for v in per_segment.values())
            checkpoints.append(
                {
                    "events": position,
                    "mean_auc": mean_auc,
                    "mean_logloss": mean_ll,
                    "waited_s": round(waited, 1),
                    "per_segment": per_segment,
                }
            )
            say(
                f"checkpoint {index + 1}/{len(positions)}: {position} events, mean AUC "
                f"{fmt(mean_auc)}, log loss {fmt(mean_ll)}, "
                f"{answered_by(0, shared_version)} serves, waited {waited:.0f} s, "
                f"{time.monotonic() - started:.0f} s in"
            )
    finally:
        if scorer is not None:
            scorer.close()
        codes = fleet.stop(options.stop_timeout_s)
        say(f"workers stopped, exit codes {codes}")
    live_seconds = time.monotonic() - started
    result: dict[str, Any] = {
        "mode": "live",
        "quick": quick,
        "run_id": run_id,
        "workers": options.workers,
        "segments": sl.segments,
        "stream_events": n,
        "checkpoint_every": every,
        "checkpoints": positions,
        "holdout_pairs": {s: len(sl.holdout[s]) for s in sl.segments},
        "holdout_digest": sl.digest(),
        "zero_shot_mean_auc": zs_mean,
        "zero_shot": zero_shot,
        "live": checkpoints,
        "exit_codes": codes,
        "dead_lettered": dead,
        "restamped": restamp,
        "settings": {k: getattr(ws, k) for k in SETTING_KEYS},
        "notes": [
            *plan.notes,
            "live: a checkpoint is measured once every produced event is accounted for and no training "
            "is queued or running; a segment waiting out a back-off (e.g. no shared model yet) is not "
            "waited for",
            "live: segment_version is the answer's model_version (0: no adapter); shared_version is the "
            "answer's shared_version (null: zero-shot)",
        ],
        "live_seconds": round(live_seconds, 1),
    }
    if options.compare_offline:
        say("offline simulation on the same slice ...")
        result["offline"], result["offline_note"] = offline_checkpoints(sl, ws, quick, positions)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _fresh(event: ClickEvent, settings: Settings) -> bool:
    """Inside the worker's accepted window: else the replay stamps the events with their produce time
    (Home Depot has no times of its own), as `python -m worker replay` does."""
    age = time.time() - event.ts.timestamp()
    return -settings.max_clock_skew_s < age < settings.max_event_age_s


def _answered(
    sl: EvalSlice, segment: str, position: int, answer: Answer, shared_version: int | None
) -> dict[str, Any]:
    """A segment's cell of a checkpoint: its metrics, and which models answered its score requests."""
    version = max(answer.versions)
    served_shared = (max(answer.shared) or None) if answer.shared else shared_version
    return {
        **holdout_metrics(labels_of(sl.holdout[segment]), answer.probs),
        "labelled": sl.labelled(segment, position),
        "segment_version": version,
        "shared_version": served_shared,
        "answered_by": answered_by(version, served_shared),
        "mixed_versions": len(answer.versions) > 1,
        "pairs": len(answer.probs),
    }


def _zero_shot(settings: Settings, sl: EvalSlice) -> dict[str, Metrics]:
    """Each segment's held-out pairs under zero-shot cosine, computed here (the workers answer the same
    before a shared model exists: checkpoint 0 repeats it through Kafka)."""
    backbone = load_backbone(settings)
    return {
        s: holdout_metrics(
            labels_of(sl.holdout[s]), score_segment(backbone, None, None, pairs_of(sl.holdout[s]))
        )
        for s in sl.segments
    }


def offline_checkpoints(
    sl: EvalSlice, settings: Settings, quick: bool, positions: Sequence[int]
) -> tuple[list[dict[str, Any]], str]:
    """The offline simulation (`offline.run_evaluation`, procedure `worker`) on the same slice, held-out
    pairs and settings, in the live shape, at the same stream positions."""
    plan = EvalPlan(notes=("offline simulation on the live slice",))
    result = run_evaluation(
        sl.as_dataset(),
        settings,
        quick=quick,
        progress=False,
        plan=plan,
        procedures=("worker",),
        stream_checkpoints=positions,
    )
    measured = [c["events"] for c in result["stream"]]
    if measured != list(positions):
        raise RuntimeError(f"the offline simulation measured {measured}, the live run {list(positions)}")
    out: list[dict[str, Any]] = []
    for checkpoint in result["stream"]:
        per = {
            s: {**m, "labelled": sl.labelled(s, checkpoint["events"])}
            for s, m in checkpoint["per_segment"].items()
        }
        out.append({**checkpoint, "per_segment": per})
    note = (
        "offline: the simulation measured at the same stream positions, the last one before its final "
        "shared run (as the live workers: none runs after the stream); its versions count every run, "
        "promoted or not, as the registry numbers them"
    )
    return out, note
