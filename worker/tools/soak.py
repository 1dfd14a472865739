"""`python -m worker.tools.soak --minutes 10` (`make soak`): a worker process under a steady load for a while.

Starts `python -m worker run` on its own topics, consumer group, Redis prefix and model store (so the
stack it points at is shared safely), produces Home Depot click events at a steady rate (restamped, with
ids unique to the run) so that trainings are in flight while events keep coming, and every few seconds
samples the worker's consumer lag and counters from its /metrics endpoint and its resident memory from
/proc/PID/status. At the end it stops producing, waits until every acknowledged event is counted in
Redis exactly once, stops the worker with SIGTERM (it must exit 0) and prints the figures, the last line
as JSON. Exit status 0 only when no event was lost or doubled and the worker stayed up.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson

from worker.config import Settings, load_settings
from worker.tools.procs import child_env, free_port, rss_kib, start_worker, stop_worker, wait_healthy
from worker.tools.replay import produce_when_room
from worker.tools.run_settings import isolated

SAMPLE_EVERY_S = 5.0


def _metrics(port: int) -> dict[str, float]:
    """Sum of each `ctr_worker_*` sample over its labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("ctr_worker_"):
            continue
        m = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if m and m.group(2) != "NaN":
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


# CPU-sized so that trainings keep up with 50 ev/s on 2 cores (about one segment run every 10 s): small
# inputs, one epoch, 512 new events per run, a minute between runs of a segment. With 32 new events per
# run (the default) a CPU falls behind: the training queue fills, ingest pauses, and the backlog grows
# without bound. A setting given in the environment wins over these.
_SOAK_DEFAULTS: dict[str, object] = {
    "max_seq_len": 16,
    "adapter_epochs": 1,
    "min_new_events": 512,
    "train_cooldown_s": 60,
    "shared_every": 5000,
    "shared_bootstrap_min_events": 256,
}


def _soak_settings(settings: Settings, run: str, out_dir: Path) -> Settings:
    """The run's own topics, group, Redis prefix and model store, plus the CPU-sized defaults. No fixed
    metrics port: `soak` picks a free one when it starts the worker, so it knows where to sample."""
    defaults = {k: v for k, v in _SOAK_DEFAULTS.items() if k not in settings.model_fields_set}
    return isolated(settings, f"soak-{run}", model_store=out_dir / "models", metrics_port=0, **defaults)


class _Producer(threading.Thread):
    """Click events at `rate` per second until stopped; counts what the broker acknowledged."""

    def __init__(self, settings: Settings, rate: float, run: str) -> None:
        super().__init__(name="soak-producer", daemon=True)
        from worker.stream.kafka import make_producer
        from worker.tools.datasets import load_homedepot

        self.settings = settings
        self.rate = rate
        self.run_id = run
        self.events = load_homedepot().stream()
        self.producer = make_producer(settings)
        self.stop = threading.Event()
        self.sent = 0
        self.acked = 0
        self.errors: list[str] = []

    def _done(self, err: Any, msg: Any) -> None:
        if err is None:
            self.acked += 1
        else:
            self.errors.append(str(err))

    def run(self) -> None:
        from worker.events import now_utc

        start = time.monotonic()
        i = 0
        while not self.stop.is_set():
            base = self.events[i % len(self.events)]
            event = base.model_copy(
                update={"event_id": f"{base.event_id}-{self.run_id}-{i}", "ts": now_utc()}
            )
            produce_when_room(
                self.producer,
                self.settings.input_topic,
                event.segment.encode("utf-8", "surrogatepass"),
                event.to_json(),
                self._done,
            )
            i += 1
            self.sent = i
            self.producer.poll(0)
            ahead = i / self.rate - (time.monotonic() - start)
            if ahead > 0:
                self.stop.wait(ahead)
        self.producer.flush(60)


def soak(
    settings: Settings, minutes: float, rate: float, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    from worker.state.buffer import Buffer
    from worker.stream.kafka import ensure_topics, make_admin, partition_count

    run = uuid.uuid4().hex[:8]
    out_dir = (settings.cache_dir / "soak" / run).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _soak_settings(settings, run, out_dir)
    topics = [
        settings.input_topic,
        settings.dlq_topic,
        settings.scores_topic,
        settings.versions_topic,
        settings.requests_topic,
    ]
    ensure_topics(settings, topics)
    log_path = out_dir / "worker.log"
    port = free_port()
    proc = start_worker({**child_env(settings, metrics_port=port), **(extra_env or {})}, log_path)
    print(f"soak {run}: worker pid {proc.pid}, log {log_path}", flush=True)
    wait_healthy(proc, port, log_path, 120)
    buffer = Buffer(settings)
    partitions = range(partition_count(settings, settings.input_topic))

    def counted() -> tuple[int, int]:
        stats = [buffer.partition_stats(p) for p in partitions]
        return sum(x.get("events", 0) for x in stats), sum(x.get("duplicates", 0) for x in stats)

    producer = _Producer(settings, rate, run)
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    producer.start()
    deadline = started + minutes * 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            samples.append(_sample(proc.pid, port, started, producer.acked))
            s = samples[-1]
            s["backlog"] = producer.acked - counted()[0]
            print(
                f"t={s['t']:6.0f}s produced={s['produced']:6d} consumed={s.get('consumed', 0):6.0f} "
                f"lag={s.get('lag', -1):5.0f} backlog={s['backlog']:6d} rss={s['rss_mib'] or 0:.0f} MiB "
                f"trainings={s.get('trainings', 0):.0f}",
                flush=True,
            )
            time.sleep(min(SAMPLE_EVERY_S, max(0.0, deadline - time.monotonic())))
    finally:
        producer.stop.set()
        producer.join(120)
    produce_s = time.monotonic() - started
    alive_at_end = proc.poll() is None
    # Wait for the backlog to drain while the worker makes progress (at most 60 s without any).
    events, dups = counted()
    settle_started = time.monotonic()
    last_progress = time.monotonic()
    while alive_at_end and events < producer.acked and time.monotonic() - last_progress < 60:
        time.sleep(1)
        before = events
        events, dups = counted()
        if events > before:
            last_progress = time.monotonic()
    settle_s = time.monotonic() - settle_started
    if alive_at_end:
        samples.append(_sample(proc.pid, port, started, producer.acked))
    try:
        code = stop_worker(proc, 120)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    lags = [s["lag"] for s in samples if "lag" in s]
    backlogs = [s["backlog"] for s in samples if "backlog" in s]
    rss = [s["rss_mib"] for s in samples if s["rss_mib"]]
    versions = _versions(log_path)
    result: dict[str, Any] = {
        "run": run,
        "minutes": round(produce_s / 60, 2),
        "target_rate": rate,
        "rate": round(producer.acked / produce_s, 2),
        "produced": producer.acked,
        "produce_errors": len(producer.errors),
        "counted": events,
        "duplicates": dups,
        "lost": producer.acked - events,
        "max_lag": max(lags) if lags else None,
        "max_backlog": max(backlogs) if backlogs else None,
        "drain_s": round(settle_s, 1),
        "final_lag": lags[-1] if lags else None,
        "rss_mib_start": rss[0] if rss else None,
        "rss_mib_end": rss[-1] if rss else None,
        "rss_mib_max": max(rss) if rss else None,
        "trainings": versions,
        "samples": len(samples),
        "worker_alive_until_end": alive_at_end,
        "worker_exit_code": code,
        "log": str(log_path),
    }
    result["ok"] = bool(
        alive_at_end and code == 0 and events == producer.acked and dups == 0 and not producer.errors
    )
    (out_dir / "samples.json").write_bytes(orjson.dumps(samples))
    admin = make_admin(settings)
    for future in admin.delete_topics(topics, request_timeout=30).values():
        try:
            future.result(timeout=30)
        except Exception as exc:
            print(f"could not delete a soak topic: {exc}", file=sys.stderr)
    buffer.purge()
    return result


def _sample(pid: int, port: int, started: float, produced: int) -> dict[str, Any]:
    rss = rss_kib(pid)
    s: dict[str, Any] = {
        "t": round(time.monotonic() - started, 1),
        "produced": produced,
        "rss_mib": round(rss / 1024, 1) if rss else None,
    }
    try:
        m = _metrics(port)
    except OSError:
        return s
    s["lag"] = m.get("ctr_worker_consumer_lag", 0.0)
    s["consumed"] = m.get("ctr_worker_events_consumed_total", 0.0)
    s["trainings"] = m.get("ctr_worker_trainings_started_total", 0.0)
    s["queue_depth"] = m.get("ctr_worker_train_queue_depth", 0.0)
    s["paused"] = m.get("ctr_worker_ingest_paused", 0.0)
    return s


def _versions(log_path: Path) -> dict[str, int]:
    """Training decisions from the worker's log, by scope and decision."""
    out: dict[str, int] = {}
    for raw in log_path.read_bytes().splitlines():
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if rec.get("event") in ("segment run", "shared run"):
            key = f"{rec['event'].split()[0]}_{rec.get('decision')}"
            out[key] = out.get(key, 0) + 1
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to produce (default 10)")
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (default 50)")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    result = soak(settings, args.minutes, args.rate)
    print(
        f"rate {result['rate']} ev/s for {result['minutes']} min; produced {result['produced']}, "
        f"counted {result['counted']} (lost {result['lost']}, duplicates {result['duplicates']}); "
        f"max lag {result['max_lag']} (/metrics), max backlog {result['max_backlog']} (produced - counted), "
        f"final lag {result['final_lag']}, drained in {result['drain_s']} s; "
        f"RSS {result['rss_mib_start']} -> {result['rss_mib_end']} MiB (max {result['rss_mib_max']}); "
        f"trainings {result['trainings']}; worker exit {result['worker_exit_code']}"
    )
    print(orjson.dumps(result).decode())
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker soak", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
