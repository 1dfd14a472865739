"""A table of commands and its dispatch: each command's module is imported only when it runs. The
top-level table is `worker.cli`'s; `python -m worker bench` keeps one of its own."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol, cast


class Command(Protocol):
    """What a command's module offers the table: its options, and its entry point given them."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def cli_main(self, args: argparse.Namespace) -> int: ...


class ToolingMissing(RuntimeError):
    """A command whose module is not installed (the production image ships without `worker/tools`)."""


Table = Mapping[str, tuple[str, str]]
"""Command name -> (module, one-line help)."""


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


def write_result(result: Mapping[str, object], as_json: bool) -> None:
    """A command's result on stdout: one JSON line for scripts, else one aligned `key: value` a line."""
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    width = max((len(k) for k in result), default=0)
    for key, value in result.items():
        sys.stdout.write(f"{key:>{width}}: {value}\n")
