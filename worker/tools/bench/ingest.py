"""`python -m worker bench ingest`: the worker's ingest path against a raw consume loop, in the same run.

Both read the same preloaded messages from the same topic under fresh consumer groups. The clock starts
just before the consume call that returns the first message (so group joins do not count) and stops when
(a) the raw loop has seen every message, (b) the worker has stored every offset in Redis. The raw loop
takes a fraction of a second, so it runs `raw_repeats` times and the median counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from typing import Any

import orjson

from worker.config import Settings, isolated, load_settings
from worker.state.buffer import Buffer
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics, make_admin, make_consumer, make_producer
from worker.tools.bench.synthetic import synthetic_events
from worker.tools.replay import ReplayError, produce_when_room


def preload(settings: Settings, messages: list[tuple[bytes, bytes]]) -> None:
    prod = make_producer(settings, **{"linger.ms": 20, "batch.size": 1_000_000})
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value in messages:
        produce_when_room(prod, settings.input_topic, key, value, delivered)
    prod.flush(120)
    if errors or len(prod):
        raise ReplayError(f"preload failed: {errors[:3]}, {len(prod)} unacknowledged")


def measure_raw(settings: Settings, n: int, run: int = 0) -> float:
    """Seconds a bare consume loop takes to see all n messages (`run`: a fresh consumer group each)."""
    consumer = make_consumer(settings, **{"group.id": f"{settings.group_id}-raw{run}"})
    consumer.subscribe([settings.input_topic])
    seen = 0
    t0: float | None = None
    deadline = time.monotonic() + 300
    try:
        while seen < n and time.monotonic() < deadline:
            t = time.perf_counter()
            msgs = consumer.consume(settings.consume_batch, settings.consume_timeout_s)
            if msgs and t0 is None:
                t0 = t
            for msg in msgs:
                if msg.error() is None:
                    seen += 1
        end = time.perf_counter()
    finally:
        consumer.close()
    if seen < n or t0 is None:
        raise RuntimeError(f"raw consumer saw {seen} of {n} messages")
    return end - t0


def measure_worker(settings: Settings, n: int) -> tuple[float, int]:
    """Seconds the worker takes from the first message to all n offsets stored in Redis."""
    ingestor = Ingestor(settings)
    ingestor.subscribe()
    t0: float | None = None
    deadline = time.monotonic() + 300
    try:
        while ingestor.stats.consumed < n and time.monotonic() < deadline:
            t = time.perf_counter()
            if ingestor.poll_once() and t0 is None:
                t0 = t
        ingestor.flush()  # the last batch's Redis write is still in flight
        end = time.perf_counter()
    finally:
        ingestor.close()
    if t0 is None:
        raise RuntimeError("the worker consumed nothing")
    parts = make_admin(settings).list_topics(settings.input_topic, timeout=10).topics[settings.input_topic]
    stored = ingestor.buffer.stored_offsets(parts.partitions)
    return end - t0, sum(v or 0 for v in stored.values())


def run_bench(
    settings: Settings, events: int, segments: int, keep: bool = False, raw_repeats: int = 3
) -> dict[str, Any]:
    s = isolated(settings, f"bench-{uuid.uuid4().hex[:8]}")
    ensure_topics(s, [s.input_topic, s.dlq_topic])
    buffer = Buffer(s)
    try:
        messages = synthetic_events(events, segments)
        t = time.perf_counter()
        preload(s, messages)
        preload_s = time.perf_counter() - t
        raw_runs = [measure_raw(s, events, run) for run in range(raw_repeats)]
        raw_s = statistics.median(raw_runs)
        worker_s, stored = measure_worker(s, events)
        if stored != events:
            raise RuntimeError(f"worker stored offsets covering {stored} of {events} messages")
        counts = buffer.redis.hget(buffer.partition_key(0, "stats"), "events")
        raw_rate = events / raw_s
        rate = events / worker_s
        return {
            "bench": "ingest",
            "events": events,
            "segments": segments,
            "partitions": s.topic_partitions,
            "consume_batch": s.consume_batch,
            "preload_s": round(preload_s, 3),
            "raw_s": round(raw_s, 3),
            "raw_runs_s": [round(x, 3) for x in raw_runs],
            "worker_s": round(worker_s, 3),
            "raw_events_per_s": round(raw_rate, 1),
            "events_per_s": round(rate, 1),
            "ratio": round(rate / raw_rate, 3),
            "stored_offsets": stored,
            "partition0_events": int(counts or 0),
        }
    finally:
        if not keep:
            buffer.purge()
            buffer.redis.close()
            make_admin(s).delete_topics([s.input_topic, s.dlq_topic])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--segments", type=int, default=500)
    parser.add_argument(
        "--consume-batch",
        type=int,
        default=None,
        help="messages per consume() for both loops (default: settings)",
    )
    parser.add_argument("--raw-repeats", type=int, default=3, help="raw loop runs (median counts)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.add_argument("--keep", action="store_true", help="keep the topic and Redis keys afterwards")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.consume_batch:
        settings = settings.model_copy(update={"consume_batch": args.consume_batch})
    result = run_bench(settings, args.events, args.segments, keep=args.keep, raw_repeats=args.raw_repeats)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>20}: {value}", file=sys.stderr)
    print(orjson.dumps(result).decode())
    return 0
