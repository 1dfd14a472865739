"""`python -m worker bench NAME`: each benchmark measures the worker's path and a raw baseline in one run."""

from __future__ import annotations

import argparse
import importlib
from typing import Protocol, cast

BENCHES = {
    "ingest": "worker.tools.bench.ingest",
    "train": "worker.tools.bench.train",
    "freshness": "worker.tools.bench.freshness",
    "scale": "worker.tools.bench.scale",
    "capacity": "worker.tools.bench.capacity",
}


class _Bench(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def cli_main(self, args: argparse.Namespace) -> int: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options")


def cli_main(args: argparse.Namespace) -> int:
    """Imports only the chosen benchmark, so `bench ingest` does not import torch."""
    bench = cast(_Bench, importlib.import_module(BENCHES[args.name]))
    parser = argparse.ArgumentParser(prog=f"python -m worker bench {args.name}")
    bench.add_arguments(parser)
    return bench.cli_main(parser.parse_args(args.bench_args))
