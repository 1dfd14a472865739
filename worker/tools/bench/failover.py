"""`python -m worker bench failover`: how long a partition goes unserved when its owner is SIGKILLed with
`--events` events buffered, and what those events cost in memory.

One partition, two processes of one consumer group, twice in the same run:
- raw: two bare confluent-kafka consumers (the baseline: nothing to recover, only the group's wait);
- worker: two `python -m worker ingest` processes, the events buffered in Redis.

The first process is started alone and takes in every preloaded event (the worker: until its stored offsets
cover them; its RSS and Redis's `used_memory` are read before and after, the memory the buffered events
cost). Then the second joins; the range assignor may hand the partition to either, so the bench reads both
members' logs for who holds it and SIGKILLs that one. It produces a few new events and times how long until
the survivor handles its first message (raw: the first batch it consumes; worker: the first event it
accepts, read from the partition's counters in Redis). A killed consumer does not leave the group, so the
broker waits `session_timeout_ms` before it moves the partition: that wait is in both figures, and the ratio
shows what the worker adds to it."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from worker.config import Settings, load_settings
from worker.state import client as redis_clients
from worker.state.buffer import Buffer
from worker.stream.kafka import ensure_topics, make_producer
from worker.tools.bench.ingest import delete_topics, preload
from worker.tools.bench.scale import wait_stable
from worker.tools.bench.synthetic import synthetic_events
from worker.tools.procs import child_env
from worker.tools.run_settings import isolated

POLL_S = 0.01
FRESH_EVENTS = 200


def _say(msg: str) -> None:
    print(f"[bench failover] {msg}", file=sys.stderr, flush=True)


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (Linux `/proc`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _produce_fresh(settings: Settings) -> None:
    """A few new events after the kill (ids of their own), so the survivor has something to take in."""
    prod = make_producer(settings)
    for key, value in synthetic_events(FRESH_EVENTS, 10, seed=1):
        prod.produce(settings.input_topic, value=value, key=key, partition=0)
    if prod.flush(30):
        raise RuntimeError("fresh events still unacknowledged after 30 s")


def _wait(condition: Any, what: str, procs: list[subprocess.Popen[bytes]], timeout_s: float = 300) -> float:
    """Polls `condition()` until it is true; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        if procs and all(p.poll() is not None for p in procs):
            raise RuntimeError(f"every process exited while waiting for {what}")
        time.sleep(POLL_S)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    """The JSON log lines of one process whose `event` is `name` (other lines skipped)."""
    out = []
    for line in log.read_bytes().splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict) and doc.get("event") == name:
            out.append(doc)
    return out


def _owner(logs: list[Path], procs: list[subprocess.Popen[bytes]]) -> int:
    """Which of two group members holds the partition, from their logs' last `assigned` lines: the range
    assignor may give it to the one that joined last, so the bench kills whichever holds it."""
    found: list[int] = []

    def settled() -> bool:
        last = [_events(log, "assigned") for log in logs]
        holders = [i for i, lines in enumerate(last) if lines and lines[-1]["partitions"] == [0]]
        if all(last) and len(holders) == 1:
            found[:] = holders
            return True
        return False

    _wait(settled, "one member to hold the partition", procs, timeout_s=60)
    return found[0]


@dataclass
class Side:
    """One side of the bench: the members' command, and what 'buffered' and 'took over' mean for it."""

    cmd: list[str]
    buffered: Callable[[Path], bool]
    progress: Callable[[Path], int]


def _handover(settings: Settings, group: str, side: Side, logdir: Path, events: int) -> dict[str, Any]:
    """Start the owner, load `events` into the partition, wait until `side.buffered`, start a second
    member, SIGKILL whichever holds the partition and produce fresh events: seconds until the survivor's
    `side.progress` moves. The owner's RSS and Redis's `used_memory` are read around the loading."""
    env = child_env(settings, group_id=group)
    logs = [logdir / f"{group}-{i}.log" for i in (0, 1)]
    redis = redis_clients.from_settings(settings)

    def start(log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(side.cmd, env=env, stdout=out, stderr=out)

    procs = [start(logs[0])]
    try:
        wait_stable(settings, group, 1, procs)
        rss_before, redis_before = rss_bytes(procs[0].pid), int(redis.info("memory")["used_memory"])
        preload(settings, synthetic_events(events, 100))
        _wait(lambda: side.buffered(logs[0]), "the owner to take in the events", procs)
        rss_after, redis_after = rss_bytes(procs[0].pid), int(redis.info("memory")["used_memory"])
        procs.append(start(logs[1]))
        wait_stable(settings, group, 2, procs)
        owner = _owner(logs, procs)
        survivor = 1 - owner
        mark = side.progress(logs[survivor])
        procs[owner].kill()
        killed = time.monotonic()
        _produce_fresh(settings)
        done = _wait(
            lambda: side.progress(logs[survivor]) > mark, "the survivor to take over", [procs[survivor]]
        )
    finally:
        _kill(procs)
        redis.close()
    return {
        "s": done - killed,
        "rss_delta_bytes": rss_after - rss_before,
        "redis_delta_bytes": redis_after - redis_before,
    }


def raw_side(events: int) -> Side:
    """Bare consumers: buffered once the owner consumed every event; progress: batches consumed."""

    def buffered(log: Path) -> bool:
        seen = _events(log, "consumed")
        return bool(seen) and seen[-1]["n"] >= events

    return Side(
        [sys.executable, "-m", "worker.tools.bench.failover", "--raw-child"],
        buffered,
        lambda log: len(_events(log, "consumed")),
    )


def raw_child() -> None:
    """A bare consumer that prints its assignments and its running count after every batch as JSON lines
    (the bench reads them from its log)."""
    from worker.stream.kafka import make_consumer

    settings = load_settings()
    consumer = make_consumer(settings, **{"enable.auto.commit": True})

    def assigned(_consumer: Any, partitions: list[Any]) -> None:
        doc = {"event": "assigned", "partitions": [p.partition for p in partitions]}
        print(orjson.dumps(doc).decode(), flush=True)

    consumer.subscribe([settings.input_topic], on_assign=assigned)
    seen = 0
    while True:
        msgs = consumer.consume(settings.consume_batch, settings.consume_timeout_s)
        n = sum(1 for m in msgs if m.error() is None)
        if n:
            seen += n
            print(orjson.dumps({"event": "consumed", "n": seen}).decode(), flush=True)


def worker_side(settings: Settings, buffer: Buffer, events: int) -> Side:
    """`worker ingest` processes: buffered once the stored offsets cover every event; progress: events
    accepted into the partition (its counter in Redis)."""
    return Side(
        [sys.executable, "-m", "worker", "ingest", "--no-create-topics"],
        lambda _log: (buffer.stored_offsets([0])[0] or 0) >= events,
        lambda _log: buffer.partition_stats(0).get("events", 0),
    )


def run_bench(settings: Settings, events: int, session_timeout_ms: int) -> dict[str, Any]:
    logdir = Path(settings.cache_dir) / "runs" / f"bench-failover-{uuid.uuid4().hex[:8]}"
    logdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, Any]] = {}
    for what in ("raw", "worker"):
        s = isolated(settings, f"bench-failover-{what}-{uuid.uuid4().hex[:8]}", topic_partitions=1)
        s = s.model_copy(update={"session_timeout_ms": session_timeout_ms})
        ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=1)
        buffer = Buffer(s)
        side = raw_side(events) if what == "raw" else worker_side(s, buffer, events)
        try:
            result[what] = _handover(s, s.group_id, side, logdir, events)
            _say(f"{what}: the partition moved after {result[what]['s']:.2f} s")
        finally:
            buffer.purge()
            buffer.redis.close()
            delete_topics(s, [s.input_topic, s.dlq_topic])
    raw, worker = result["raw"], result["worker"]
    return {
        "bench": "failover",
        "buffered_events": events,
        "session_timeout_ms": session_timeout_ms,
        "raw_failover_s": round(raw["s"], 3),
        "failover_s": round(worker["s"], 3),
        "ratio": round(worker["s"] / raw["s"], 3),
        "raw_rss_delta_bytes": raw["rss_delta_bytes"],
        "rss_delta_bytes": worker["rss_delta_bytes"],
        "redis_delta_bytes": worker["redis_delta_bytes"],
        "rss_bytes_per_100k_events": round(worker["rss_delta_bytes"] * 100_000 / events),
        "redis_bytes_per_100k_events": round(worker["redis_delta_bytes"] * 100_000 / events),
        "logs": str(logdir),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=100_000, help="events buffered before the kill")
    parser.add_argument(
        "--session-timeout-ms",
        type=int,
        default=6_000,
        help="the consumers' session timeout (the broker's group.min.session.timeout.ms is 6000 by default)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON result line on stdout")


def cli_main(args: argparse.Namespace) -> int:
    result = run_bench(load_settings(), args.events, args.session_timeout_ms)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>30}: {value}", file=sys.stderr)
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":  # a raw consumer child: python -m worker.tools.bench.failover --raw-child
    raw_child()
