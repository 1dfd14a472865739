"""What the compute thread's jobs did, counted in memory for `Worker.summary` (operators read the
Prometheus counters of `worker.ops.metrics`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkerStats:
    trainings: dict[str, int] = field(default_factory=lambda: {"promoted": 0, "rejected": 0, "failed": 0})
    shared_runs: dict[str, int] = field(default_factory=lambda: {"promoted": 0, "rejected": 0, "failed": 0})
    scores_published: int = 0
    requests_answered: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0
