"""`python -m worker stack up|down|status|kafka-tool`: the command line of the local stack."""

from __future__ import annotations

import argparse
import sys

from worker.config import Settings, load_settings
from worker.tools.stack.kafka_secure import up_secure
from worker.tools.stack.kafka_tools import KAFKA_TOOLS, run_kafka_tool
from worker.tools.stack.lifecycle import down, status, up
from worker.tools.stack.processes import StackError


def _flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--secure",
        action="store_true",
        help="up: Kafka with SASL/PLAIN and ACLs; the worker user is WORKER_KAFKA_SASL_USERNAME/PASSWORD",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="up: a 3-master Redis Cluster at WORKER_REDIS_URL=redis+cluster://127.0.0.1:PORT "
        "(PORT, PORT+1, PORT+2) instead of one Redis",
    )
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["up", "down", "status", "kafka-tool"],
        help="kafka-tool TOOL ARGS...: Kafka's own tool against WORKER_KAFKA_BOOTSTRAP, TOOL one of "
        + ", ".join(KAFKA_TOOLS),
    )
    _flags(parser)
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _kafka_tool(settings: Settings, rest: list[str]) -> int:
    usage = (
        f"usage: python -m worker stack kafka-tool TOOL [ARGS...], TOOL one of "
        f"{', '.join(KAFKA_TOOLS)}; `stack kafka-tool TOOL --help` shows the tool's own options"
    )
    if not rest or rest[0] in ("-h", "--help"):
        print(usage, file=sys.stdout if rest else sys.stderr)
        return 0 if rest else 2
    try:
        return run_kafka_tool(settings, rest[0], rest[1:])
    except StackError as exc:
        print(f"stack kafka-tool failed: {exc}", file=sys.stderr)
        return 2


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    rest: list[str] = list(getattr(args, "tool_args", None) or [])
    if args.action == "kafka-tool":
        return _kafka_tool(settings, rest)
    if rest:  # flags given after the action: `stack up --redis-cluster`
        _flags(argparse.ArgumentParser(prog=f"stack {args.action}")).parse_args(rest, namespace=args)
    if args.action == "up":
        try:
            if getattr(args, "secure", False):
                started = up_secure(settings)
            else:
                started = up(settings, redis_cluster=getattr(args, "redis_cluster", False))
        except StackError as exc:
            print(f"stack up failed: {exc}", file=sys.stderr)
            return 1
        for name, what in started.items():
            print(f"{name}: {what}")
        return 0
    if args.action == "down":
        for name, what in down(settings).items():
            print(f"{name}: {what}")
        return 0
    report = status(settings)
    for name, info in report.items():
        state = "healthy" if info["healthy"] else "DOWN"
        print(f"{name}: {info['endpoint']} {state}")
    return 0 if all(info["healthy"] for info in report.values()) else 1
