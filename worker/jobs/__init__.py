"""The compute thread's jobs, each in the one module that owns its order of steps: a segment's training
(`segment_job`), the group's shared run (`shared_job`), score requests and refreshed scores (`scoring`),
the registry's outboxes (`outboxes`) and the periodic checks that call them (`housekeeping`).
`worker.app.Worker` builds them and runs them on its compute thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.learn.learner import Learner


def loaded(learner: Callable[[], Learner | None]) -> Learner:
    """The worker's models: every job runs on the compute thread, after `Worker.run` loaded them."""
    models = learner()
    assert models is not None, "the models load in Worker.run"
    return models
