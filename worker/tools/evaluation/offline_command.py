"""The offline evaluation from the command line: `python -m worker eval` without `--live`.

Also runnable alone, `python -m worker.tools.evaluation.offline_command`, with the offline options only:
it imports no Kafka or Redis client, so it runs on a GPU machine that has torch but neither client
(`deploy/gpu-check.sh`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from worker.config import Settings, load_settings
from worker.tools.datasets import Dataset, load_dataset
from worker.tools.evaluation.offline import run_evaluation
from worker.tools.evaluation.options import add_offline_arguments, write_json
from worker.tools.evaluation.plan import full_plan, quick_plan_for
from worker.tools.evaluation.plot import plot_curve
from worker.tools.evaluation.report import print_table


def run_offline_command(args: argparse.Namespace, settings: Settings, dataset: Dataset) -> int:
    """The run (partial JSON to `--out` after each phase), then `--plot`, `--out` and the JSON line
    (`--json`) or the table."""

    def write_partial(partial: dict[str, Any]) -> None:
        if args.out is not None:
            write_json(args.out, json.dumps(partial, default=str))

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
        write_json(args.out, text)
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        print_table(result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.tools.evaluation.offline_command", description=__doc__
    )
    add_offline_arguments(parser)
    args = parser.parse_args(argv)
    return run_offline_command(args, load_settings(), load_dataset(args.data, holdout_frac=args.holdout_frac))


if __name__ == "__main__":
    raise SystemExit(main())
