"""`python -m worker bench scale --workers 1,2,3`: ingest throughput as worker processes are added.

Scale-out is partitions shared by the processes of one consumer group, so what it can show is how the
sum over processes grows with their number. For each count N, two fresh topics get the same preloaded
events and each is read by N processes in a fresh consumer group:

- raw: N bare confluent-kafka consumers (auto-commit on, nothing else done with the messages), the ceiling;
- worker: N `python -m worker ingest --idle-exit S` processes, each storing events and offsets in Redis.

Group formation is kept out of the figure: the preload is one open Kafka transaction, so the
(read_committed) consumers see nothing until the bench has watched the group become stable with all N
members holding partitions; only then is it committed. Otherwise the first process to start would read
much of the topic alone before the others joined. The clock starts at the first progress seen (the first
batch a raw consumer got; the first offsets the bench sees stored in Redis, polled every few ms) and stops
at the last; the events of that first observation are not counted, so both sides measure events handled
per second by the formed group.

On a 2-core box N processes share two cores with Kafka and Redis: the rows show the shape, not a scale
limit. Progress goes to stderr, the JSON result is the last stdout line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from worker.config import Settings, load_settings
from worker.state.buffer import Buffer
from worker.stream.kafka import ensure_topics, make_admin, make_consumer, make_producer
from worker.tools.bench.synthetic import synthetic_events
from worker.tools.procs import child_env
from worker.tools.replay import produce_when_room
from worker.tools.run_settings import isolated

POLL_S = 0.005
NOTE = "2 cores: shape only"
RAW_IDLE_S = 2.0


def _say(msg: str) -> None:
    print(f"[bench scale] {msg}", file=sys.stderr, flush=True)


def _stop_all(procs: list[subprocess.Popen[bytes]], timeout_s: float, terminate: bool = False) -> list[int]:
    """Exit codes; with `terminate`, SIGTERM first (ingest stores, commits and leaves on SIGTERM)."""
    if terminate:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    deadline = time.monotonic() + timeout_s
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def gated_preload(settings: Settings, messages: list[tuple[bytes, bytes]]) -> Producer:
    """Write every message inside one open transaction; read_committed consumers see them on commit."""
    prod = make_producer(
        settings,
        **{"transactional.id": f"bench-scale-{uuid.uuid4().hex}", "linger.ms": 20, "batch.size": 1_000_000},
    )
    prod.init_transactions(30)
    prod.begin_transaction()
    for key, value in messages:
        produce_when_room(prod, settings.input_topic, key, value)
    if prod.flush(120):
        raise RuntimeError("preload: messages still unacknowledged after 120 s")
    return prod


def wait_stable(
    settings: Settings, group: str, members: int, procs: list[subprocess.Popen[bytes]], timeout_s: float = 120
) -> None:
    """Until the broker reports `group` stable with `members` members that hold every partition."""
    from confluent_kafka import ConsumerGroupState

    admin = make_admin(settings)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a child exited before group {group} formed")
        desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
        held = [len(m.assignment.topic_partitions) for m in desc.members]
        if (
            desc.state == ConsumerGroupState.STABLE
            and len(held) == members
            and sum(held) == settings.topic_partitions
            and (members > settings.topic_partitions or min(held) > 0)
        ):
            time.sleep(0.5)  # let each member's assign callback (Redis offsets, seek) run
            return
        time.sleep(0.1)
    raise RuntimeError(f"group {group} did not become stable with {members} members in {timeout_s} s")


# ---------------------------------------------------------------- raw consumers


def raw_child(group: str, idle_exit_s: float) -> dict[str, Any]:
    """One bare consumer of the group: consume until idle, report wall-clock first/last batch times."""
    settings = load_settings()
    consumer = make_consumer(
        settings, **{"group.id": group, "enable.auto.commit": True, "enable.auto.offset.store": True}
    )
    consumer.subscribe([settings.input_topic])
    seen = first_n = 0
    t_first = t_last = 0.0
    last_progress = time.monotonic()
    try:
        while True:
            msgs = consumer.consume(settings.consume_batch, settings.consume_timeout_s)
            n = sum(1 for m in msgs if m.error() is None)
            if n:
                now = time.time()
                if not seen:
                    t_first, first_n = now, n
                t_last = now
                seen += n
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > (idle_exit_s if seen else 300):
                break
    finally:
        consumer.close()
    return {"seen": seen, "t_first": t_first, "first_n": first_n, "t_last": t_last}


def measure_raw(settings: Settings, workers: int, total: int, release: Callable[[], None]) -> dict[str, Any]:
    group = f"{settings.group_id}-raw{workers}"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.tools.bench.scale",
                "--raw-child",
                group,
                "--idle-exit",
                str(RAW_IDLE_S),
            ],
            env=child_env(settings, group_id=group),
            stdout=subprocess.PIPE,
        )
        for _ in range(workers)
    ]
    try:
        wait_stable(settings, group, workers, procs)
        release()
        _stop_all(procs, 300)
        reports = []
        for p in procs:
            assert p.stdout is not None
            out = p.stdout.read().decode().strip().splitlines()
            if p.returncode != 0 or not out:
                raise RuntimeError(f"a raw consumer failed (exit {p.returncode})")
            reports.append(orjson.loads(out[-1]))
    finally:
        _stop_all(procs, 10, terminate=True)
    active = [r for r in reports if r["seen"]]
    seen = sum(r["seen"] for r in reports)
    if seen < total or not active:
        raise RuntimeError(f"raw consumers saw {seen} of {total} messages")
    first = min(active, key=lambda r: r["t_first"])
    span = max(r["t_last"] for r in active) - first["t_first"]
    skew = max(r["t_first"] for r in active) - first["t_first"]
    return {"s": span, "rate": (total - first["first_n"]) / span, "reread": seen - total, "skew": skew}


# ---------------------------------------------------------------- worker ingest processes


def measure_worker(
    settings: Settings,
    workers: int,
    total: int,
    release: Callable[[], None],
    idle_exit_s: float,
    logs: Path,
) -> dict[str, Any]:
    """N `python -m worker ingest` processes; progress is read from the offsets they store in Redis."""
    group = f"{settings.group_id}-w{workers}"
    buffer = Buffer(settings)
    partitions = list(range(settings.topic_partitions))
    cmd = [sys.executable, "-m", "worker", "ingest", "--idle-exit", str(idle_exit_s), "--no-create-topics"]
    procs = [
        subprocess.Popen(
            cmd,
            env=child_env(settings, group_id=group),
            stdout=subprocess.DEVNULL,
            stderr=(logs / f"ingest-{workers}-{i}.log").open("wb"),
        )
        for i in range(workers)
    ]
    try:
        wait_stable(settings, group, workers, procs)
        release()
        t0 = 0.0
        c0 = stored = 0
        deadline = time.monotonic() + 300
        while stored < total:
            if time.monotonic() > deadline or all(p.poll() is not None for p in procs):
                raise RuntimeError(f"worker ingest stored {stored} of {total} offsets (logs in {logs})")
            stored = sum(v or 0 for v in buffer.stored_offsets(partitions).values())
            now = time.perf_counter()
            if stored and not t0:
                t0, c0 = now, stored
            if stored < total:
                time.sleep(POLL_S)
        t1 = time.perf_counter()
        codes = _stop_all(procs, 60, terminate=True)
        if any(codes):
            raise RuntimeError(f"worker ingest exit codes {codes} (logs in {logs})")
        events = sum(buffer.partition_stats(p).get("events", 0) for p in partitions)
        if events != total:
            raise RuntimeError(f"worker ingest counted {events} events of {total}")
        return {"s": t1 - t0, "rate": (total - c0) / (t1 - t0), "events": events}
    finally:
        _stop_all(procs, 10, terminate=True)
        buffer.purge()
        buffer.redis.close()


def _fresh(settings: Settings, what: str, partitions: int) -> Settings:
    s = isolated(settings, f"bench-scale-{what}-{uuid.uuid4().hex[:8]}", topic_partitions=partitions)
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=partitions)
    return s


def run_bench(
    settings: Settings,
    worker_counts: list[int],
    events: int,
    segments: int,
    partitions: int,
    idle_exit_s: float,
) -> dict[str, Any]:
    messages = synthetic_events(events, segments)
    logs = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows = []
    for n in worker_counts:
        result: dict[str, dict[str, Any]] = {}
        for what in ("raw", "worker"):
            s = _fresh(settings, what, partitions)
            try:
                t = time.perf_counter()
                prod = gated_preload(s, messages)
                _say(
                    f"{what} x{n}: {events} events preloaded (uncommitted) in {time.perf_counter() - t:.1f} s"
                )

                def release(prod: Producer = prod) -> None:
                    prod.commit_transaction(60)

                if what == "raw":
                    result[what] = measure_raw(s, n, events, release)
                else:
                    result[what] = measure_worker(s, n, events, release, idle_exit_s, logs)
                _say(f"{what} x{n}: {result[what]['rate']:.0f} events/s over {result[what]['s']:.3f} s")
            finally:
                make_admin(s).delete_topics([s.input_topic, s.dlq_topic])
        raw, wrk = result["raw"], result["worker"]
        rows.append(
            {
                "workers": n,
                "events_per_s": round(wrk["rate"], 1),
                "raw_events_per_s": round(raw["rate"], 1),
                "ratio": round(wrk["rate"] / raw["rate"], 3),
                "worker_s": round(wrk["s"], 3),
                "raw_s": round(raw["s"], 3),
                "raw_reread": raw["reread"],
                "raw_start_skew_s": round(raw["skew"], 3),
                "events_counted": wrk["events"],
            }
        )
    return {
        "bench": "scale",
        "events": events,
        "segments": segments,
        "partitions": partitions,
        "cpus": os.cpu_count(),
        "rows": rows,
        "note": NOTE,
    }


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts must be >= 1")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_counts, default=[1, 2, 3], help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument(
        "--idle-exit", type=float, default=60.0, help="safety net: an ingest process exits after S s idle"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON result line on stdout")


def cli_main(args: argparse.Namespace) -> int:
    result = run_bench(
        load_settings(), args.workers, args.events, args.segments, args.partitions, args.idle_exit
    )
    if not args.json:
        for row in result["rows"]:
            print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":  # a raw consumer child: python -m worker.tools.bench.scale --raw-child GROUP
    child = argparse.ArgumentParser()
    child.add_argument("--raw-child", required=True)
    child.add_argument("--idle-exit", type=float, default=RAW_IDLE_S)
    ns = child.parse_args()
    print(orjson.dumps(raw_child(ns.raw_child, ns.idle_exit)).decode())
