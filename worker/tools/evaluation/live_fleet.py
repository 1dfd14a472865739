"""The live evaluation's workers: N `python -m worker run` processes of one consumer group, and when they
are idle, read from each one's `/metrics`: every produced event accounted for (buffered, duplicate or
dead-lettered) and no training pending, queued or running."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from worker.config import Settings
from worker.tools.procs import child_env, free_port, http_get, start_worker, wait_ready

SETTLE_S = 3.0
"""An idle state must hold this long, counters unchanged, before a checkpoint is measured. Longer than
the worker's `SHARED_CHECK_S` (2 s), the period at which the shared trainer recounts the group's new
events: with 1 s, a checkpoint could be measured after the events of a due shared run had arrived and
before the trainer had counted them, so the run was not yet pending (seen on the generated shop)."""


class LiveEvalError(RuntimeError):
    """A worker died, never became ready or idle, or answers did not come back in time."""


@dataclass(frozen=True)
class WorkerLoad:
    """What one scrape of a worker's /metrics says about its progress."""

    accounted: int
    """Input events it has written, dropped as duplicates or dead-lettered."""
    dead_lettered: int
    pending: int
    queue_depth: int
    started: int
    finished: int


def parse_load(text: str) -> WorkerLoad:
    """Sum the samples a checkpoint waits on; raises when the worker does not export the pending gauge."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    if "ctr_worker_trainings_pending" not in values:
        raise LiveEvalError(
            "the worker exports no ctr_worker_trainings_pending: a worker older than this tool"
        )
    dead = int(values.get("ctr_worker_events_dead_lettered_total", 0))
    finished = sum(
        values.get(f"ctr_worker_trainings_{d}_total", 0.0) for d in ("promoted", "rejected", "failed")
    )
    return WorkerLoad(
        accounted=int(
            values.get("ctr_worker_events_buffered_total", 0)
            + values.get("ctr_worker_events_deduplicated_total", 0)
            + dead
        ),
        dead_lettered=dead,
        pending=int(values["ctr_worker_trainings_pending"]),
        queue_depth=int(values.get("ctr_worker_train_queue_depth", 0)),
        started=int(values.get("ctr_worker_trainings_started_total", 0)),
        finished=int(finished),
    )


def is_idle(loads: Sequence[WorkerLoad], produced: int) -> bool:
    return sum(w.accounted for w in loads) >= produced and all(
        w.pending == 0 and w.queue_depth == 0 and w.started == w.finished for w in loads
    )


@dataclass
class Fleet:
    """N `python -m worker run` processes of one consumer group, each with its metrics port and log."""

    settings: Settings
    size: int
    log_dir: Path
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def log(self, i: int) -> Path:
        return self.log_dir / f"worker-{i}.log"

    def start(self, ready_timeout_s: float) -> None:
        for i in range(self.size):
            port = free_port()
            self.ports.append(port)
            self.procs.append(start_worker(child_env(self.settings, metrics_port=port), self.log(i)))
        for i, (proc, port) in enumerate(zip(self.procs, self.ports, strict=True)):
            wait_ready(proc, port, self.log(i), ready_timeout_s)

    def check_alive(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() is not None:
                tail = self.log(i).read_text(errors="replace")[-3000:]
                raise LiveEvalError(f"worker {i} exited with {proc.returncode}:\n{tail}")

    def loads(self) -> list[WorkerLoad]:
        out = []
        for port in self.ports:
            status, body = http_get(port, "/metrics")
            if status != 200:
                raise LiveEvalError(f"/metrics on port {port} answered {status}")
            out.append(parse_load(body.decode()))
        return out

    def wait_idle(self, produced: int, timeout_s: float) -> list[WorkerLoad]:
        """Until the workers have accounted for `produced` events and nothing is pending, the same for
        `SETTLE_S` with no training started or finished meanwhile."""
        deadline = time.monotonic() + timeout_s
        since: float | None = None
        seen: tuple[int, int] | None = None
        loads: list[WorkerLoad] = []
        while time.monotonic() < deadline:
            self.check_alive()
            loads = self.loads()
            counts = (sum(w.started for w in loads), sum(w.finished for w in loads))
            if is_idle(loads, produced) and counts == seen and since is not None:
                if time.monotonic() - since >= SETTLE_S:
                    return loads
            elif is_idle(loads, produced):
                since, seen = time.monotonic(), counts
            else:
                since, seen = None, None
            time.sleep(0.2)
        raise LiveEvalError(
            f"the workers were not idle within {timeout_s:.0f} s after {produced} events: {loads}"
        )

    def stop(self, timeout_s: float) -> list[int | None]:
        """One SIGTERM each, all at once, so they drain together (a second signal would exit at once);
        exit codes, None for one killed after `timeout_s`."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(None)
        return codes
