"""`eval --live` from the command line: the run with its progress on stderr, then the JSON (`--out`,
`--json`), the plot (`--plot`) or a line per checkpoint, and a non-zero exit when a worker did not exit 0."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from worker.config import Settings
from worker.tools.datasets import Dataset
from worker.tools.evaluation.live import LiveOptions, run_live
from worker.tools.evaluation.live_fleet import LiveEvalError
from worker.tools.evaluation.metrics import fmt
from worker.tools.evaluation.options import write_json


def plot_live(result: Mapping[str, Any], path: Path) -> Path:
    """Mean held-out AUC over the stream: live, offline when present, and zero-shot (PNG)."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for key, label, style in (
        ("live", f"live ({result['workers']} worker(s))", "o-"),
        ("offline", "offline", "s--"),
    ):
        points = [(c["events"], c["mean_auc"]) for c in result.get(key) or [] if c["mean_auc"] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=label)
    if result.get("zero_shot_mean_auc") is not None:
        ax.axhline(result["zero_shot_mean_auc"], color="grey", linestyle=":", label="zero-shot")
    ax.set_xlabel("events of the slice produced")
    ax.set_ylabel(f"mean held-out AUC ({len(result['segments'])} segments)")
    ax.set_title("live evaluation" + (" (quick)" if result.get("quick") else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def run_live_command(args: argparse.Namespace, settings: Settings, dataset: Dataset) -> int:
    """`eval --live`: progress on stderr, the JSON as the last stdout line with `--json`."""

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    options = LiveOptions(
        workers=args.workers or 1,
        limit=args.limit,
        checkpoint_every=args.checkpoint_every,
        compare_offline=args.compare_offline,
    )
    try:
        result = run_live(dataset, settings, args.quick, options, say=say)
    except (LiveEvalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, default=str)
    if args.out is not None:
        write_json(args.out, text)
    if args.plot is not None:
        plot_live(result, args.plot)
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        for c in result["live"]:
            offline = next((o for o in result.get("offline") or [] if o["events"] == c["events"]), None)
            extra = "" if offline is None else f"  offline {fmt(offline['mean_auc'])}"
            print(
                f"{c['events']:>8} events  live AUC {fmt(c['mean_auc'])}  "
                f"log loss {fmt(c['mean_logloss'])}{extra}"
            )
    ok = all(code == 0 for code in result["exit_codes"])
    if not ok:
        print(f"error: a worker did not exit 0: {result['exit_codes']}", file=sys.stderr)
    return 0 if ok else 1
