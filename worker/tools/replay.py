"""`python -m worker replay`: a data set's click events into the input topic, keyed by segment, in order.

Held-out pairs are never produced (`Dataset.stream()`). The Home Depot data has no timestamps, so its
events are stamped with the time they are produced (otherwise every one would be older than
`max_event_age_s` and go to the dead-letter topic); JSONL events keep their own `ts`. Event ids are
stable, so replaying a data set twice adds nothing: the worker drops the second copy as duplicates.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from worker.config import Settings, load_settings
from worker.events import ClickEvent, now_utc
from worker.stream.kafka import ensure_topics, make_producer
from worker.tools.datasets import SHOP, load_dataset


class ReplayError(RuntimeError):
    """Some events were not acknowledged by the broker."""


class _Deliveries:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[str] = []

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.ok += 1
        else:
            self.errors.append(str(err))


def produce_events(
    settings: Settings,
    events: Iterable[ClickEvent],
    *,
    topic: str | None = None,
    rate: float | None = None,
    restamp: bool = False,
    total: int | None = None,
    progress: bool = False,
    producer: Producer | None = None,
) -> int:
    """Produce events keyed by segment, at most `rate` per second; returns how many the broker acked."""
    target = topic or settings.input_topic
    own = producer is None
    prod = producer or make_producer(settings)
    done = _Deliveries()
    start = time.monotonic()
    sent = 0
    bar = _progress_bar(progress)
    task = bar.add_task(f"replay → {target}", total=total)
    with bar:
        for event in events:
            if restamp:
                event = event.model_copy(update={"ts": now_utc()})
            produce_when_room(
                prod, target, event.segment.encode("utf-8", "surrogatepass"), event.to_json(), done
            )
            sent += 1
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    prod.poll(0)
                    time.sleep(ahead)
            if sent % 1000 == 0:
                prod.poll(0)
                bar.update(task, completed=sent)
        prod.flush(60)
        bar.update(task, completed=sent)
    if own and len(prod) > 0:
        raise ReplayError(f"{len(prod)} events still unacknowledged after 60 s")
    if done.errors:
        raise ReplayError(f"{len(done.errors)} events failed: {done.errors[:3]}")
    return done.ok


def produce_when_room(
    prod: Producer,
    topic: str,
    key: bytes,
    value: bytes,
    on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
) -> None:
    """The producer's local queue is bounded: when it is full, serve deliveries until there is room,
    rather than lose the message."""
    while True:
        try:
            prod.produce(topic, key=key, value=value, on_delivery=on_delivery)
            return
        except BufferError:
            prod.poll(0.05)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def dataset_events(spec: str, limit: int | None = None) -> tuple[list[ClickEvent], bool]:
    """The events a replay produces, and whether they need produce-time stamps (having none)."""
    dataset = load_dataset(spec)
    events = dataset.stream()
    if limit is not None:
        events = events[:limit]
    return events, Path(spec).suffix != ".jsonl"


def replay(
    settings: Settings,
    spec: str,
    *,
    rate: float | None = None,
    limit: int | None = None,
    topic: str | None = None,
    progress: bool = False,
) -> int:
    target = topic or settings.input_topic
    events, restamp = dataset_events(spec, limit)
    ensure_topics(settings, [target])
    return produce_events(
        settings, events, topic=target, rate=rate, restamp=restamp, total=len(events), progress=progress
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        nargs="?",
        default=SHOP,
        help="`shop` (generated, synthetic; the default), `homedepot`, a Home Depot .csv.gz or a .jsonl file",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="events per second (default: as fast as possible)"
    )
    parser.add_argument("--limit", type=int, default=None, help="produce only the first N events")
    parser.add_argument("--topic", default=None, help="topic (default: WORKER_INPUT_TOPIC)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    topic = args.topic or settings.input_topic
    try:
        n = replay(
            settings,
            args.data,
            rate=args.rate,
            limit=args.limit,
            topic=topic,
            progress=not args.no_progress,
        )
    except (ReplayError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"produced {n} events to {topic}")
    return 0
