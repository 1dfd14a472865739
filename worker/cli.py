"""`python -m worker COMMAND ...`: a thin table of commands; each lives in the module that does the work."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

from worker.config import ConfigError


class _Command(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def cli_main(self, args: argparse.Namespace) -> int: ...


COMMANDS: dict[str, tuple[str, str]] = {
    "stack": ("worker.tools.stack", "start, stop or check the local Kafka and Redis"),
    "schemas": ("worker.tools.schemas", "regenerate schemas/ and the README settings table from the code"),
    "replay": ("worker.tools.replay", "produce a data set's click events into the input topic"),
    "ingest": ("worker.stream.ingest", "consume click events into the Redis buffers (no training)"),
    "run": ("worker.app", "run the worker: ingest, train, publish"),
    "eval": ("worker.tools.evaluate", "offline evaluation on real data, no Kafka needed"),
    "models": ("worker.state.registry", "list, show or roll back model versions"),
    "bench": ("worker.tools.bench", "benchmarks against raw baselines, JSON output"),
    "soak": ("worker.tools.soak", "a worker under steady load: lag, memory, no event lost"),
    "demo": ("worker.tools.demo", "the whole job on the local stack with a Home Depot replay"),
}


def _load(module: str) -> _Command:
    return cast(_Command, importlib.import_module(module))


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "usage: python -m worker COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Imports only the chosen command's module, so `stack status` does not pay for importing torch."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if not args_in or args_in[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args_in else 2
    name = args_in[0]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, help_text = COMMANDS[name]
    command = _load(module)
    parser = argparse.ArgumentParser(prog=f"python -m worker {name}", description=help_text)
    command.add_arguments(parser)
    args = parser.parse_args(args_in[1:])
    try:
        return command.cli_main(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
