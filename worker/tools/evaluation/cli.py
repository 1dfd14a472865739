"""`python -m worker eval`: the offline evaluation (`offline`), or with `--live` the live one (`live`)."""

from __future__ import annotations

import argparse
import sys

from worker.config import Settings, load_settings
from worker.tools.datasets import load_dataset
from worker.tools.evaluation.live_command import run_live_command
from worker.tools.evaluation.offline_command import run_offline_command
from worker.tools.evaluation.options import add_live_arguments, add_offline_arguments, live_only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_offline_arguments(parser)
    add_live_arguments(parser)


def cli_main(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """Exit status 2, before anything is loaded, for a live option without `--live`."""
    given = live_only(args)
    if given and not args.live:
        print(f"error: {', '.join(given)} only with --live", file=sys.stderr)
        return 2
    settings = settings or load_settings()
    dataset = load_dataset(args.data, holdout_frac=args.holdout_frac)
    if args.live:
        return run_live_command(args, settings, dataset)
    return run_offline_command(args, settings, dataset)
