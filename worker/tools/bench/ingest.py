"""`python -m worker bench ingest`: the worker's ingest path against a raw consume loop, in the same run.

Both read the same preloaded messages from the same topic under fresh consumer groups. The clock starts
just before the consume call that returns the first message (so group joins do not count) and stops when
(a) the raw loop has seen every message, (b) the worker has stored every offset in Redis. Two raw loops
run: one that only counts messages, and one that also parses each value with orjson (the least any
JSON consumer does, `raw_decode_*`: the fair denominator). Each takes a fraction of a second, so each runs
`raw_repeats` times and the median counts.

What the worker's ingest costs Redis is read from the server around the worker's run (`INFO commandstats`
counts the commands a script runs too; `INFO cpu` the main thread's CPU): `redis_calls_per_event` and
`redis_cpu_us_per_event`. They are server-wide, so nothing else should use that Redis meanwhile; against a
Redis Cluster they are left out.

With `--redis-cluster URL` the worker's ingest runs a second time in the same run, on the same topic under
another fresh group, against a Redis Cluster: the result has both, each against the same raw baseline.
The bench deletes its topics at the end and waits until the broker has.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException
from redis.cluster import RedisCluster

from worker.config import ConfigError, Settings, load_settings, redis_cluster_nodes
from worker.logs import configure_logging
from worker.state import client as redis_clients
from worker.state.buffer import Buffer
from worker.state.client import RedisClient
from worker.state.keys import prefix_pattern
from worker.stream.ingest import Ingestor
from worker.stream.kafka import ensure_topics, make_admin, make_consumer, make_producer
from worker.tools.bench.synthetic import synthetic_events
from worker.tools.replay import ReplayError, produce_when_room
from worker.tools.run_settings import isolated


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


@dataclass(frozen=True)
class RedisCounters:
    """A single Redis server's totals: commands run (scripts' own commands included) and main-thread CPU."""

    calls: int
    cpu_s: float

    @classmethod
    def read(cls, client: RedisClient) -> RedisCounters:
        stats = client.info("commandstats")
        calls = sum(
            int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info"
        )
        cpu = client.info("cpu")
        user = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"])
        system = cpu.get("used_cpu_sys_main_thread", cpu["used_cpu_sys"])
        return cls(calls, float(user) + float(system))

    def since(self, before: RedisCounters) -> RedisCounters:
        return RedisCounters(self.calls - before.calls, self.cpu_s - before.cpu_s)


def measure_raw(settings: Settings, n: int, run: int = 0, decode: bool = False) -> float:
    """Seconds a bare consume loop takes to see all n messages (`run`: a fresh consumer group each);
    `decode`: it also parses every value with orjson."""
    consumer = make_consumer(settings, **{"group.id": f"{settings.group_id}-raw{'d' if decode else ''}{run}"})
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
                    if decode:
                        orjson.loads(msg.value() or b"null")
                    seen += 1
        end = time.perf_counter()
    finally:
        consumer.close()
    if seen < n or t0 is None:
        raise RuntimeError(f"raw consumer saw {seen} of {n} messages")
    return end - t0


def measure_worker(settings: Settings, n: int) -> tuple[float, int, RedisCounters | None]:
    """Seconds the worker takes from the first message to all n offsets stored in Redis, the offsets
    stored, and (single Redis only) what the run cost the server, group join and start-up included."""
    probe = redis_clients.from_settings(settings)
    single = not isinstance(probe, RedisCluster)
    before = RedisCounters.read(probe) if single else None
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
    cost = None if before is None else RedisCounters.read(probe).since(before)
    probe.close()
    if t0 is None:
        raise RuntimeError("the worker consumed nothing")
    parts = make_admin(settings).list_topics(settings.input_topic, timeout=10).topics[settings.input_topic]
    stored = ingestor.buffer.stored_offsets(parts.partitions)
    return end - t0, sum(v or 0 for v in stored.values()), cost


def delete_topics(settings: Settings, topics: list[str], timeout_s: float = 60.0) -> None:
    """Delete `topics` and wait for the broker to confirm each (a topic already gone is fine). The admin
    client stays referenced until then: a collected client cancels its requests."""
    admin = make_admin(settings)
    futures = admin.delete_topics(topics, operation_timeout=timeout_s)
    for future in futures.values():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise


def _on_cluster(s: Settings, url: str, events: int, raw_rate: float, single_rate: float) -> dict[str, Any]:
    """The worker's ingest of the same topic again, under a fresh group, into a Redis Cluster."""
    sc = s.model_copy(update={"redis_url": url, "group_id": f"{s.group_id}-cluster"})
    worker_s, stored, _ = measure_worker(sc, events)
    if stored != events:
        raise RuntimeError(f"on the cluster the worker stored offsets covering {stored} of {events} messages")
    keys = redis_clients.master_key_counts(Buffer(sc).redis, prefix_pattern(sc.redis_prefix))
    rate = events / worker_s
    return {
        "masters": len(keys),
        "worker_s": round(worker_s, 3),
        "events_per_s": round(rate, 1),
        "ratio": round(rate / raw_rate, 3),
        "vs_single_node": round(rate / single_rate, 3),
        "stored_offsets": stored,
        "keys_per_master": keys,
    }


def run_bench(
    settings: Settings,
    events: int,
    segments: int,
    keep: bool = False,
    raw_repeats: int = 5,
    redis_cluster: str | None = None,
) -> dict[str, Any]:
    """`redis_cluster`: a `redis+cluster://` URL; the worker's ingest also runs against it, same topic."""
    if redis_cluster is not None and redis_cluster_nodes(redis_cluster) is None:
        raise ConfigError(f"--redis-cluster takes a redis+cluster:// URL, got {redis_cluster!r}")
    s = isolated(settings, f"bench-{uuid.uuid4().hex[:8]}")
    ensure_topics(s, [s.input_topic, s.dlq_topic])
    buffer = Buffer(s)
    cluster: dict[str, Any] | None = None
    try:
        messages = synthetic_events(events, segments)
        t = time.perf_counter()
        preload(s, messages)
        preload_s = time.perf_counter() - t
        raw_runs = [measure_raw(s, events, run) for run in range(raw_repeats)]
        raw_s = statistics.median(raw_runs)
        decode_runs = [measure_raw(s, events, run, decode=True) for run in range(raw_repeats)]
        decode_s = statistics.median(decode_runs)
        worker_s, stored, cost = measure_worker(s, events)
        if stored != events:
            raise RuntimeError(f"worker stored offsets covering {stored} of {events} messages")
        counts = buffer.redis.hget(buffer.partition_key(0, "stats"), "events")
        raw_rate = events / raw_s
        decode_rate = events / decode_s
        rate = events / worker_s
        if redis_cluster is not None:
            cluster = _on_cluster(s, redis_cluster, events, raw_rate, rate)
        result = {
            "bench": "ingest",
            "topic": s.input_topic,
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
            "raw_decode_s": round(decode_s, 3),
            "raw_decode_runs_s": [round(x, 3) for x in decode_runs],
            "raw_decode_events_per_s": round(decode_rate, 1),
            "ratio_vs_decode": round(rate / decode_rate, 3),
            "stored_offsets": stored,
            "partition0_events": int(counts or 0),
        }
        if cost is not None:
            result["redis_calls_per_event"] = round(cost.calls / events, 3)
            result["redis_cpu_us_per_event"] = round(cost.cpu_s * 1e6 / events, 3)
        if cluster is not None:
            result["redis_cluster"] = cluster
        return result
    finally:
        if not keep:
            buffer.purge()
            buffer.redis.close()
            if redis_cluster is not None:
                Buffer(s.model_copy(update={"redis_url": redis_cluster})).purge()
            delete_topics(s, [s.input_topic, s.dlq_topic])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--segments", type=int, default=500)
    parser.add_argument(
        "--consume-batch",
        type=int,
        default=None,
        help="messages per consume() for both loops (default: settings)",
    )
    parser.add_argument("--raw-repeats", type=int, default=5, help="runs of each raw loop (median counts)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line")
    parser.add_argument("--keep", action="store_true", help="keep the topic and Redis keys afterwards")
    parser.add_argument(
        "--redis-cluster",
        metavar="URL",
        default=None,
        help="also run the worker's ingest against this Redis Cluster (redis+cluster://host:port), same run",
    )


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)  # JSON on stderr: stdout carries only the result
    if args.consume_batch:
        settings = settings.model_copy(update={"consume_batch": args.consume_batch})
    result = run_bench(
        settings,
        args.events,
        args.segments,
        keep=args.keep,
        raw_repeats=args.raw_repeats,
        redis_cluster=args.redis_cluster,
    )
    if not args.json:
        for key, value in result.items():
            print(f"{key:>20}: {value}", file=sys.stderr)
    print(orjson.dumps(result).decode())
    return 0
