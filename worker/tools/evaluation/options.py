"""The options of `python -m worker eval`: the offline evaluation's, and the group that only `--live`
takes (`live_only` names those given without it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.tools.evaluation.plan import PROCEDURES


def _spacing(text: str) -> float:
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 1.0, got {text}")
    return value


def add_offline_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    live = parser.add_argument_group("live evaluation (worker/tools/evaluation/live.py)")
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


def live_only(args: argparse.Namespace) -> list[str]:
    """The live group's options given, `--live` aside."""
    return [
        flag
        for flag, value in (
            ("--workers", args.workers),
            ("--limit", args.limit),
            ("--checkpoint-every", args.checkpoint_every),
            ("--compare-offline", args.compare_offline or None),
        )
        if value is not None
    ]


def write_json(path: Path, text: str) -> None:
    """`--out`: the JSON result, its folder made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
