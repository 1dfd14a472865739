"""`python -m worker bench NAME`: each benchmark measures the worker's path and a raw baseline in one run."""

from __future__ import annotations

import argparse

from worker.commands import Table, dispatch

BENCHES: Table = {
    "ingest": ("worker.tools.bench.ingest", "the worker's ingest path against a raw consume loop"),
    "train": ("worker.tools.bench.train", "training and scoring speed against a plain torch loop"),
    "score": ("worker.tools.bench.score", "scoring from raw pairs against the forward pass alone"),
    "freshness": ("worker.tools.bench.freshness", "from a triggering click to refreshed scores"),
    "scale": ("worker.tools.bench.scale", "ingest throughput as worker processes are added"),
    "capacity": ("worker.tools.bench.capacity", "what many segments cost one worker's memory"),
    "failover": ("worker.tools.bench.failover", "a SIGKILLed owner's partition to the survivor; memory"),
    "pool": ("worker.tools.bench.pool", "a shared run's pooling: peak memory bounded, against reading all"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options")


def cli_main(args: argparse.Namespace) -> int:
    return dispatch(BENCHES, args.name, args.bench_args, "python -m worker bench")
