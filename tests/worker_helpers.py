"""Real `python -m worker run` processes for integration tests: their environment, their JSON logs, and
readers for the topics they publish to."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer

from worker.config import Settings
from worker.events import ClickEvent
from worker.stream.kafka import client_config
from worker.tools.procs import WORKER_RUN, child_env, start_worker, stop_worker

# Tiny and fast on a CPU, with the gate opened so every challenger is promoted and the per-segment serving
# choice off: these tests exercise the running worker; the gate's own decisions are tested in test_gate.py
# and test_train.py, the serving choice in test_choice.py and test_serving.py.
SMALL: dict[str, object] = {
    "max_seq_len": 16,
    "min_new_events": 16,
    "min_positives": 2,
    "min_negatives": 2,
    "train_cooldown_s": 0,
    "shared_every": 100000,
    "shared_bootstrap_min_events": 200,
    "adapter_epochs": 1,
    "gate_auc_tolerance": 1,
    "gate_logloss_margin": 1000,
    "gate_min_holdout": 1,
    "shared_min_holdout": 1,
    "serving_choice": False,
    "drain_grace_s": 60,
    "metrics_port": 0,
}


def worker_env(
    settings: Settings, overrides: Mapping[str, object] | None = None, **extra: str
) -> dict[str, str]:
    """Exactly `settings` + SMALL + `overrides` for the child (no `WORKER_*` of the parent's leaks in),
    then `extra` raw variables on top."""
    return {**child_env(settings, **{**SMALL, **(overrides or {})}), **extra}


class WorkerProc:
    """A `python -m worker run` process (or another argv) with its stderr (JSON logs) in a file.

    Several processes may append to one log file; each reads only what was written after it started.
    """

    def __init__(
        self, env: dict[str, str], log: Path, *, name: str = "worker", argv: list[str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        self.killed_at: float | None = None
        self.offset = log.stat().st_size if log.exists() else 0
        self.proc = start_worker(env, log, argv or WORKER_RUN)

    def raw(self) -> bytes:
        return self.log.read_bytes()[self.offset :]

    def tail(self, n: int = 3000) -> str:
        return self.raw()[-n:].decode(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.raw().splitlines():
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [rec for rec in self.lines() if pred(rec)]
            if found:
                return found[0]
            assert self.alive(), f"{self.name} exited early:\n{self.tail()}"
            time.sleep(0.1)
        raise AssertionError(f"not seen in the log of {self.name} within {timeout_s} s:\n{self.tail()}")

    def wait_for_event(self, event: str, timeout_s: float) -> dict[str, Any]:
        return self.wait_for(lambda rec: rec.get("event") == event, timeout_s)

    def owned(self) -> set[int]:
        """Partitions owned now, replayed from the assigned / revoked / lost log lines."""
        owned: set[int] = set()
        for rec in self.lines():
            if rec.get("event") == "assigned":
                owned |= set(rec["partitions"])
            elif rec.get("event") in ("revoked", "lost"):
                owned -= set(rec["partitions"])
        return owned

    def kill(self) -> None:
        if self.alive():
            self.killed_at = time.time()
            self.proc.kill()
        self.proc.wait(timeout=30)

    def terminate(self, timeout_s: float = 90) -> int:
        return stop_worker(self.proc, timeout_s)


class TopicReader:
    """Reads a topic from the beginning under a fresh consumer group; `seen` holds the decoded values."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": f"read-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
            }
        )
        self.consumer.subscribe([topic])
        self.seen: list[dict[str, Any]] = []

    def poll(self) -> int:
        before = len(self.seen)
        for msg in self.consumer.consume(500, 0.5):
            value = msg.value()
            if msg.error() is None and value is not None:
                self.seen.append(orjson.loads(value))
        return len(self.seen) - before

    def until(
        self,
        done: Callable[[list[dict[str, Any]]], bool],
        timeout_s: float,
        check: Callable[[], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Reads until `done(seen)` or the timeout (then returns what it has); `check` runs each round."""
        deadline = time.monotonic() + timeout_s
        while not done(self.seen) and time.monotonic() < deadline:
            if check is not None:
                check()
            self.poll()
        return self.seen

    def close(self) -> None:
        self.consumer.close()


def read_all(
    settings: Settings, topic: str, idle_s: float = 3.0, timeout_s: float = 30.0
) -> list[dict[str, Any]]:
    """Everything on `topic`: reads until nothing new came for `idle_s`."""
    reader = TopicReader(settings, topic)
    deadline = time.monotonic() + timeout_s
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - last < idle_s:
            if reader.poll():
                last = time.monotonic()
    finally:
        reader.close()
    return reader.seen


def in_stream_order(events: Iterable[ClickEvent]) -> list[ClickEvent]:
    """Events in the order of the data set's stream (`hd-<n>` ids), as a replay produces them."""
    return sorted(events, key=lambda e: int(e.event_id.split("-")[1]))


def few_of_others(
    stream: Iterable[ClickEvent], excluded: str, per_segment: int, total: int
) -> list[ClickEvent]:
    """At most `per_segment` events of each segment but `excluded`, `total` in all, in stream order: pooled
    data for the shared model that trains no other segment on its own."""
    taken: dict[str, int] = {}
    others: list[ClickEvent] = []
    for e in stream:
        if e.segment != excluded and taken.get(e.segment, 0) < per_segment and len(others) < total:
            taken[e.segment] = taken.get(e.segment, 0) + 1
            others.append(e)
    return others
