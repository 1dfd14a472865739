"""`python -m worker COMMAND ...`: a thin table of commands; each lives in the module that does the work."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from worker.config import ConfigError


class Command(Protocol):
    """What a command's module offers the table: its options, and its entry point given them."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def cli_main(self, args: argparse.Namespace) -> int: ...


class ToolingMissing(RuntimeError):
    """A command whose module is not installed (the production image ships without `worker/tools`)."""


Table = Mapping[str, tuple[str, str]]
"""Command name -> (module, one-line help)."""

COMMANDS: Table = {
    "stack": ("worker.tools.stack", "start, stop or check the local Kafka and Redis"),
    "schemas": ("worker.tools.schemas", "regenerate schemas/ and the README settings table from the code"),
    "replay": ("worker.tools.replay", "produce a data set's click events into the input topic"),
    "generate-shop": ("worker.tools.shop", "write a generated shop (synthetic click events) as JSONL"),
    "ingest": ("worker.stream.ingest", "consume click events into the Redis buffers (no training)"),
    "run": ("worker.app", "run the worker: ingest, train, publish"),
    "reset": ("worker.stream.reset", "move a stopped group's offsets (Redis and Kafka) to reprocess"),
    "eval": ("worker.tools.evaluation.cli", "evaluation on real data: offline, or --live through workers"),
    "models": ("worker.models", "list, show, roll back, pin or unpin model versions"),
    "dlq": ("worker.tools.dlq", "list dead letters, or re-drive them to the topic they came from, once"),
    "bench": ("worker.tools.bench", "benchmarks against raw baselines, JSON output"),
    "soak": ("worker.tools.soak", "a worker under steady load: lag, memory, no event lost"),
    "demo": ("worker.tools.demo", "the whole job on the local stack, on the generated shop or real data"),
    "alerts": ("worker.ops.alerts", "write the Prometheus alerting rules, thresholds from WORKER_ALERT_*"),
}


def dispatch(table: Table, name: str, argv: Sequence[str], prog: str) -> int:
    """Runs command `name` of `table` on `argv`, importing only that command's module, so that
    `stack status` and `bench ingest` do not pay for importing torch."""
    module, help_text = table[name]
    try:
        command = cast(Command, importlib.import_module(module))
    except ModuleNotFoundError as exc:
        if exc.name is None or not module.startswith(exc.name):
            raise
        raise ToolingMissing(
            f"`{name}` is tooling ({module}), which this installation leaves out: the production image "
            "holds what `run` needs; install the project with its `tools` extra for the rest"
        ) from None
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=help_text)
    command.add_arguments(parser)
    return command.cli_main(parser.parse_args(argv))


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "usage: python -m worker COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status 2, with the message, for an unknown command or a bad setting: what to fix, no traceback."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args_in else 2
    name = args_in[0]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return dispatch(COMMANDS, name, args_in[1:], "python -m worker")
    except (ConfigError, ToolingMissing) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
