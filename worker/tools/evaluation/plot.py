"""The offline evaluation's picture: the mean AUC per checkpoint of each procedure, and each segment's
served AUC against its own zero-shot at the end, so a reader sees at a glance whether any segment is
harmed (the promise is per segment, `worker.learn.choice`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from worker.events import ServingKind
from worker.learn.choice import KINDS

HARM = 0.02
"""How far under its own zero-shot a segment may end before the plot marks it harmed."""
MARKERS: dict[ServingKind, str] = {"zero_shot": "s", "blend": "D", "shared": "o", "adapter": "^"}
"""One per serving kind (`choice.KINDS`): a kind without one fails every plot, not only its points."""


def plot_curve(result: dict[str, Any], path: Path) -> Path:
    """Left: mean AUC per checkpoint, one line per procedure. Right: per segment, the worker's AUC at
    "end" against zero-shot's on the same test pairs, marked by what serves it (PNG)."""
    fig = Figure(figsize=(13, 5))
    ax, seg_ax = fig.subplots(1, 2)
    checkpoints = list(result["mean"]["zero_shot"])
    x = list(range(len(checkpoints)))
    for proc, by_checkpoint in result["mean"].items():
        ys = [(by_checkpoint.get(name) or {}).get("auc") for name in checkpoints]
        if all(y is None for y in ys):
            continue
        ax.plot(x, [np.nan if y is None else y for y in ys], marker="o", label=proc)
    ax.set_xticks(x, checkpoints)
    ax.set_xlabel("labelled events of the segment seen")
    ax.set_ylabel(f"mean holdout AUC ({len(result['segments'])} segments)")
    ax.set_title("quick evaluation" if result.get("quick") else "evaluation")
    ax.grid(alpha=0.3)
    ax.legend()
    _segments(seg_ax, result)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _segments(ax: Axes, result: dict[str, Any]) -> None:
    points = []
    for segment, cells in result["per_segment"].items():
        worker, zero = (
            (cells["worker"].get("end") or {}).get("auc"),
            (cells["zero_shot"].get("end") or {}).get("auc"),
        )
        if worker is not None and zero is not None:
            points.append((segment, zero, worker, cells.get("served_at_end", "?"), cells.get("test_pairs")))
    if not points:
        ax.set_axis_off()
        return
    lo = min(min(p[1], p[2]) for p in points) - 0.03
    hi = max(max(p[1], p[2]) for p in points) + 0.03
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="served = zero-shot")
    ax.plot([lo, hi], [lo - HARM, hi - HARM], color="red", lw=1, ls="--", label=f"zero-shot - {HARM}")
    for kind in KINDS:
        marker = MARKERS[kind]
        mine = [p for p in points if p[3] == kind]
        if mine:
            ax.scatter(
                [p[1] for p in mine], [p[2] for p in mine], marker=marker, s=40, label=f"serves {kind}"
            )
    for segment, zero, worker, _, pairs in points:
        ax.annotate(
            f"{segment} ({pairs})", (zero, worker), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("zero-shot AUC at end (test pairs)")
    ax.set_ylabel("served AUC at end")
    ax.set_title("per segment: served against its own zero-shot")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
