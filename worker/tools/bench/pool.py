"""`python -m worker bench pool --segments 4000`: what one shared run's pooling costs the lease holder.

The group's shared trainer reads every segment of every partition. This bench fills Redis (a fresh key
prefix) with `--segments` segments of `--events` synthetic events each, through the worker's own write
path, then measures in fresh processes, side by side in the same run:

- `read_all`, the raw baseline: every segment's whole buffer read and parsed (what the trainer did before
  the pool was bounded);
- `pool`: `worker.state.pool.pool`, bounded by `--max-events` in all (`WORKER_SHARED_POOL_MAX_EVENTS`);
- with `--train`, `shared_run`: the lease holder's whole shared run in a fresh process, the backbone
  loaded, the bounded pool read and one shared training on it (`Learner.train_shared`), as the worker runs
  it; its peak is what a lease holder needs, and it does not grow with `--segments` beyond the cap;

each with its peak resident memory (VmHWM) and seconds, and the Redis commands of one due count: the
per-segment scan the trainer ran every 2 s before, against `group_new`'s per-partition counters.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from worker.config import Settings, load_settings
from worker.state.buffer import Buffer, PartitionWrite, Pending
from worker.state.entry import pair_key
from worker.tools.bench.synthetic import synthetic_events
from worker.tools.run_settings import isolated

PARTITIONS = 6


def _say(msg: str) -> None:
    print(f"[bench pool] {msg}", file=sys.stderr, flush=True)


def _hwm_mib() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(settings: Settings, segments: int, events: int) -> int:
    """`events` per segment, spread over `PARTITIONS` partitions by segment, written as ingest writes."""
    buffer = Buffer(settings)
    pairs = synthetic_events(segments * events, segments)
    by_partition: dict[int, list[Pending]] = {}
    for key, value in pairs:
        doc = orjson.loads(value)
        p = hash(key) % PARTITIONS
        pending = by_partition.setdefault(p, [])
        pair = pair_key(doc["query"], doc["item_id"])
        pending.append(Pending(len(pending), doc["segment"], doc["event_id"], doc["clicked"], pair, value))
    for p, pending in by_partition.items():
        for start in range(0, len(pending), 5000):
            chunk = pending[start : start + 5000]
            buffer.write([PartitionWrite(buffer.topic, p, chunk[-1].offset + 1, chunk)])
        _say(f"partition {p}: {len(pending)} events")
    return len(pairs)


def _measure(settings: Settings, mode: str, out: Any) -> None:
    from worker.state.pool import pool

    buffer = Buffer(settings)
    started = time.perf_counter()
    if mode == "read_all":
        held = []
        for p in range(PARTITIONS):
            for segment in buffer.segments(p):
                snap = buffer.training_snapshot(p, segment)
                held += [*snap.sample_events, *snap.new_events]
        n = len(held)
    elif mode == "pool":
        got = pool(buffer, PARTITIONS, settings)
        n = len(got.new) + len(got.older)
    else:
        from worker.learn.learner import Learner
        from worker.state.registry import Registry

        learner = Learner(settings, Registry.from_settings(settings))
        got = pool(buffer, PARTITIONS, settings)
        n = len(got.new) + len(got.older)
        candidate = learner.train_shared(got.new, got.older, (0, len(got.new)))
        rec, result = learner.record(candidate), candidate.result
        out.put(
            {
                "events": n,
                "trained_events": result.n_train,
                "decision": rec.decision,
                "seconds": round(time.perf_counter() - started, 3),
                "peak_rss_mib": _hwm_mib(),
            }
        )
        return
    out.put({"events": n, "seconds": round(time.perf_counter() - started, 3), "peak_rss_mib": _hwm_mib()})


def _in_child(settings: Settings, mode: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(settings, mode, out))
    proc.start()
    result: dict[str, Any] = out.get(timeout=3600)
    proc.join()
    return result


def _commands(buffer: Buffer) -> int:
    stats = buffer.redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def count_cost(settings: Settings) -> dict[str, Any]:
    """Redis commands of one due count: the per-segment scan before, the counters now."""
    from worker.state.pool import group_new

    buffer = Buffer(settings)

    def scan() -> int:
        return sum(st.seq for p in range(PARTITIONS) for st in buffer.segment_states(p))

    def counters() -> int:
        return group_new(buffer, PARTITIONS)

    out: dict[str, Any] = {}
    for name, count in (("scan", scan), ("counters", counters)):
        before = _commands(buffer)
        started = time.perf_counter()
        count()
        seconds = time.perf_counter() - started
        out[name] = {"redis_commands": _commands(buffer) - before - 1, "seconds": round(seconds, 4)}
    return out


def run_bench(settings: Settings, segments: int, events: int, train: bool = False) -> dict[str, Any]:
    _say(f"filling Redis: {segments} segments x {events} events")
    total = fill(settings, segments, events)
    _say("baseline: every buffer read whole")
    raw = _in_child(settings, "read_all")
    _say(f"pool bounded to {settings.shared_pool_max_events} events")
    bounded = _in_child(settings, "pool")
    shared_run = None
    if train:
        _say("a whole shared run: backbone, bounded pool, one shared training")
        shared_run = _in_child(settings, "train")
    return {
        "segments": segments,
        "events_per_segment": events,
        "buffered_events": total,
        "shared_pool_max_events": settings.shared_pool_max_events,
        "read_all": raw,
        "pool": bounded,
        "rss_ratio_pool_vs_read_all": round(bounded["peak_rss_mib"] / raw["peak_rss_mib"], 3),
        "due_count": count_cost(settings),
        **({"shared_run": shared_run} if shared_run is not None else {}),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segments", type=int, default=4000)
    parser.add_argument("--events", type=int, default=100, help="events per segment")
    parser.add_argument("--max-events", type=int, default=None, help="WORKER_SHARED_POOL_MAX_EVENTS")
    parser.add_argument(
        "--train", action="store_true", help="also a whole shared run (backbone + pool + training)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")


def cli_main(args: argparse.Namespace) -> int:
    settings = isolated(load_settings(), f"bpool{uuid.uuid4().hex[:8]}")
    if args.max_events is not None:
        settings = settings.model_copy(update={"shared_pool_max_events": args.max_events})
    try:
        result = run_bench(settings, args.segments, args.events, args.train)
    finally:
        Buffer(settings).purge()
        shutil.rmtree(settings.model_store, ignore_errors=True)
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0
