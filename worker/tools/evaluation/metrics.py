"""The evaluations' figures: a segment's held-out AUC and log loss, and their means over segments.

A log loss that is not finite (a probability of exactly 0 or 1 on the wrong label) is reported as null,
so the JSON stays valid; a null is left out of a mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from worker.ops.quality import Numbers, holdout_score

Metrics = dict[str, float | None]
"""{"auc": ..., "logloss": ...}, each null where it cannot be computed."""

METRIC_KEYS = ("auc", "logloss")


def holdout_metrics(labels: Numbers, probs: Numbers) -> Metrics:
    m = holdout_score(labels, probs)
    return {"auc": m.auc, "logloss": m.logloss if math.isfinite(m.logloss) else None}


def mean(values: Iterable[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def mean_metrics(cells: Sequence[Metrics | None]) -> Metrics:
    """Each metric's mean over the cells that have it."""
    return {key: mean(cell.get(key) for cell in cells if cell is not None) for key in METRIC_KEYS}


def fmt(x: float | None) -> str:
    """A figure for a terminal: three decimals, "-" for null."""
    return "-" if x is None else f"{x:.3f}"
