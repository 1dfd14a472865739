"""One shared run per group at a time, enforced by a Redis lock (`worker.state.lock`), not by the timing of
a lease handover: the real Redis of the local stack, the lock alone and two in-process workers' shared
runs (their training replaced by a stand-in, so no model is loaded)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from worker.app import Worker
from worker.config import Settings
from worker.events import ClickEvent
from worker.state.keys import shared_lock_key
from worker.state.lock import Lock
from worker.state.pool import Pool

pytestmark = pytest.mark.integration


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis[bytes]]:
    c: redis.Redis[bytes] = redis.Redis.from_url(settings.redis_url)
    yield c
    c.close()


@pytest.fixture
def key(settings: Settings) -> str:
    return shared_lock_key(settings.redis_prefix, settings.input_topic)


def test_one_holder_at_a_time_and_the_next_after_release(client: redis.Redis[bytes], key: str) -> None:
    first, second = Lock(client, key, 5.0, owner="first"), Lock(client, key, 5.0, owner="second")
    assert first.acquire() and first.held()
    assert not second.acquire(), "refused while the first holds it"
    assert not second.held()
    assert (second.holder() or "").startswith("first:")
    first.release()
    assert not first.held()
    assert second.acquire(), "free once released"
    assert (first.holder() or "").startswith("second:")
    second.release()
    assert client.get(key) is None


def test_renewed_while_held_beyond_its_ttl(client: redis.Redis[bytes], key: str) -> None:
    first, second = Lock(client, key, 0.3), Lock(client, key, 0.3)
    assert first.acquire()
    try:
        time.sleep(1.2)
        assert first.held()
        assert not second.acquire(), "the keeper thread renewed it past four TTLs"
    finally:
        first.release()


def test_a_lock_taken_over_is_lost_and_its_release_leaves_the_new_holder_alone(
    client: redis.Redis[bytes], key: str
) -> None:
    first = Lock(client, key, 0.3)
    assert first.acquire()
    client.set(key, b"someone-else")  # as if it expired during a stall and another holder took it
    time.sleep(0.5)
    assert not first.held()
    first.release()
    assert client.get(key) == b"someone-else"


def test_a_crashed_holders_lock_expires(settings: Settings, client: redis.Redis[bytes], key: str) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, redis\n"
            "from worker.state.lock import Lock\n"
            "lock = Lock(redis.Redis.from_url(sys.argv[1]), sys.argv[2], 1.5, owner='crashed')\n"
            "assert lock.acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            settings.redis_url,
            key,
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        time.sleep(2.0)
        other = Lock(client, key, 5.0)
        assert not other.acquire(), "a live holder keeps it renewed"
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 5.0
        while not other.acquire():
            assert time.monotonic() < deadline, "the killed holder's lock never expired"
            time.sleep(0.1)
        other.release()
    finally:
        holder.kill()
        holder.wait(10)


class _Trained(Exception):
    """Ends a stand-in shared training: what follows it (recording, publishing) is not under test."""


class _Trainer:
    """Stands in for `Learner`: counts shared trainings and runs `during` inside each."""

    shared = None

    def __init__(self, during: Callable[[], None] = lambda: None) -> None:
        self.calls = 0
        self.during = during

    def train_shared(self, new: Any, older: Any, events: Any) -> Any:
        self.calls += 1
        self.during()
        raise _Trained


def _worker(settings: Settings, trainer: _Trainer) -> Worker:
    event = ClickEvent(
        event_id="e1", ts=datetime.now(UTC), segment="s", item_id="i", item_text="t", clicked=1
    )
    worker = Worker(settings)
    worker.learner = trainer  # type: ignore[assignment]
    worker.shared_job.pool = lambda: Pool([event], [], {}, [0], {})  # type: ignore[method-assign]
    return worker


def test_two_workers_shared_runs_never_overlap(settings: Settings) -> None:
    """The second worker's run, started while the first one trains (as after a lease handover that did
    not wait for it), is refused without training; once the first run has ended, it runs."""
    second_trainer = _Trainer()
    trainings_of_second_during_first: list[int] = []
    second = _worker(settings, second_trainer)

    def while_first_trains() -> None:
        assert second.shared_job.run() is None
        trainings_of_second_during_first.append(second_trainer.calls)

    first_trainer = _Trainer(while_first_trains)
    first = _worker(settings, first_trainer)
    try:
        with pytest.raises(_Trained):
            first.shared_job.run()
        assert first_trainer.calls == 1
        assert trainings_of_second_during_first == [0], "the second run trained while the first did"
        with pytest.raises(_Trained):
            second.shared_job.run()
        assert second_trainer.calls == 1, "the second run goes ahead once the first has released"
    finally:
        for w in (first, second):
            w.request_consumer.close()
            w.lease.close()


def test_a_run_with_nothing_new_takes_the_counters_so_it_is_not_due_again(settings: Settings) -> None:
    """Counters ahead of the marks (a restored Redis): the empty run takes them and trains nothing."""
    trainer = _Trainer()
    worker = _worker(settings, trainer)
    worker.shared_job.pool = lambda: Pool([], [], {}, [], {0: 5, 1: 3})  # type: ignore[method-assign]
    try:
        assert worker.shared_job.run() is None
        assert trainer.calls == 0
        assert worker.buffer.shared_counted() == {0: 5, 1: 3}
        assert worker.shared_job.lock.acquire(), "the empty run released the lock"
        worker.shared_job.lock.release()
    finally:
        worker.request_consumer.close()
        worker.lease.close()
        worker.buffer.purge()
