"""The offline evaluation's report: what a run measured, as the JSON-ready result (also the partial one
after each phase), and as a table of means for a terminal."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from worker.config import Settings
from worker.tools.datasets import Dataset
from worker.tools.evaluation.metrics import Metrics, fmt, mean_metrics
from worker.tools.evaluation.plan import CHECKPOINT_NAMES, PROCEDURES, EvalPlan, EvalSlice
from worker.tools.evaluation.simulation import WorkerSim

SETTING_KEYS = (
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
"""The settings a result reports, after the plan's overrides."""


@dataclass
class OfflineRun:
    """An offline run's inputs and what it has measured so far.

    `cells[segment][procedure][checkpoint]`: that checkpoint's metrics, null where the segment never
    reached it; a checkpoint not measured yet is absent. `stream`: the worker at each stream position
    asked for, None when none was."""

    dataset: Dataset
    settings: Settings
    plan: EvalPlan
    quick: bool
    procedures: Sequence[str]
    data: EvalSlice
    labels: dict[str, np.ndarray]
    positions: dict[str, dict[str, int]]
    sim: WorkerSim
    device: str
    stream: list[dict[str, Any]] | None
    started: float
    cells: dict[str, dict[str, dict[str, Metrics | None]]] = field(default_factory=dict)
    batch_trained_on: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.data.segments:
            self.cells.setdefault(s, {p: {} for p in PROCEDURES})
            self.batch_trained_on.setdefault(s, {})


def offline_result(run: OfflineRun, partial: str | None = None) -> dict[str, Any]:
    """The JSON-ready result; `partial` names the phase just finished while the run goes on."""
    segments, sim, plan = run.data.segments, run.sim, run.plan
    filled: dict[str, dict[str, Any]] = {s: {p: dict(run.cells[s][p]) for p in PROCEDURES} for s in segments}
    for s in segments:
        for proc in PROCEDURES:
            for name in CHECKPOINT_NAMES:
                filled[s][proc].setdefault(name, None)
        filled[s]["test_pairs"] = len(run.data.holdout[s])
        filled[s]["positives"] = int(run.labels[s].sum())
        filled[s]["served_at_end"] = sim.serving(s)
    mean = {
        proc: {name: mean_metrics([filled[s][proc][name] for s in segments]) for name in CHECKPOINT_NAMES}
        for proc in PROCEDURES
    }
    return {
        **({} if partial is None else {"partial": partial}),
        **({"stream": list(run.stream)} if run.stream is not None else {}),
        "quick": run.quick,
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
        "stream_events": len(run.data.stream),
        "holdout_pairs": {s: len(run.data.holdout[s]) for s in segments},
        "checkpoint_positions": run.positions,
        "batch_trained_on": run.batch_trained_on,
        "pair_level_holdout": [s for s in segments if s in run.dataset.pair_level],
        "device": run.device,
        "settings": {k: getattr(run.settings, k) for k in SETTING_KEYS},
        "plan": {
            "batch_spacing": plan.batch_spacing,
            "batch_epochs": plan.batch_epochs,
            "naive_epochs": plan.naive_epochs,
            "naive_lr": plan.naive_lr,
        },
        "procedures": [p for p in PROCEDURES if p in run.procedures or p in ("worker", "zero_shot")],
        "notes": [
            *plan.notes,
            *run.dataset.notes,
            "zero_shot probability: sigmoid(10 * (cosine - 0.35)), fixed, not fitted",
            "batch: trained from scratch on the stream up to each checkpoint's position, one model per "
            f"distinct position, spacing {plan.batch_spacing:g} (batch_trained_on: its events)",
            "naive '0' is zero-shot; naive 'end' is trained on all of the segment's replayed events",
        ],
        "seconds": round(time.perf_counter() - run.started, 1),
    }


def print_table(result: dict[str, Any]) -> None:
    """Mean AUC / log loss per procedure and checkpoint, on stdout."""
    table = Table(title=f"mean holdout AUC / log loss over {len(result['segments'])} segments")
    table.add_column("procedure")
    for name in CHECKPOINT_NAMES:
        table.add_column(name, justify="right")
    for proc in PROCEDURES:
        cells = []
        for name in CHECKPOINT_NAMES:
            m = result["mean"][proc][name]
            cells.append(f"{fmt(m['auc'])} / {fmt(m['logloss'])}")
        table.add_row(proc, *cells)
    Console().print(table)
