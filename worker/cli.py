"""`python -m worker COMMAND ...`: a thin table of commands; each lives in the module that does the work."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from worker.commands import Table, ToolingMissing, dispatch
from worker.config import ConfigError

COMMANDS: Table = {
    "stack": ("worker.tools.stack", "start, stop or check the local Kafka and Redis"),
    "schemas": ("worker.tools.schemas", "regenerate schemas/ and the README settings table from the code"),
    "replay": ("worker.tools.replay", "produce a data set's click events into the input topic"),
    "generate-shop": ("worker.tools.shop", "write a generated shop (synthetic click events) as JSONL"),
    "ingest": ("worker.stream.ingest_command", "consume click events into the Redis buffers (no training)"),
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
