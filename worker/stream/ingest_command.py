"""`python -m worker ingest`: consume click events into the Redis buffers, no training (`Ingestor`)."""

from __future__ import annotations

import argparse
import signal
import threading
from types import FrameType

import redis
import structlog

from worker.config import load_settings
from worker.logs import configure_logging
from worker.stream.dead_letters import DeadLetterError
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics

log = structlog.get_logger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--idle-exit", type=float, default=None, metavar="S", help="stop after S seconds without messages"
    )
    parser.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    if not args.no_create_topics:
        ensure_topics(settings, [settings.input_topic, settings.dlq_topic])
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        ingestor = Ingestor(settings)  # a Redis Cluster client asks for the slot layout at once
    except redis.RedisError as exc:
        log.error("start-up failed", error=str(exc))
        return 2
    try:
        ingestor.run(stop, idle_exit_s=args.idle_exit)
    except DeadLetterError as exc:
        log.error("dead_letter_unconfirmed", error=str(exc))
        return 1
    return 0
