"""One shared trainer for the whole consumer group, chosen by Kafka (`worker.stream.lease`).

Real `python -m worker run` processes with shared retraining on: only the lease holder trains the
shared model, on events of every partition (its own and the other workers'), no two shared trainings
overlap, and when the holder is SIGKILLed (after a run, or in the middle of one) a survivor takes the
lease and continues from the champion. Two workers with an opened gate on Home Depot; three workers on
six partitions with the gate at its defaults on the generated shop, where a shared model can win.
Short sequences and one torch thread each, so that three torch processes fit a 2-core box.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import TopicReader, WorkerProc, worker_env

from worker.config import Settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer
from worker.stream.kafka import ensure_topics
from worker.tools import shop
from worker.tools.datasets import load_homedepot
from worker.tools.replay import produce_events

pytestmark = [pytest.mark.integration, pytest.mark.scale]

PARTITIONS = 4
GROUP: dict[str, object] = {
    "topic_partitions": PARTITIONS,
    "session_timeout_ms": 6000,
    "train_backoff_s": 1,
    "shared_every": 120,
    "shared_bootstrap_min_events": 250,
    "min_new_events": 100_000,
    "shared_epochs": 1,
    "torch_threads": 1,
    "drain_grace_s": 30,
}


def _ts(rec: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00"))


def _spans(proc: WorkerProc) -> list[tuple[datetime, datetime | None, dict[str, Any]]]:
    """(start, end or None, start record) of every shared training in the process's log."""
    spans: list[tuple[datetime, datetime | None, dict[str, Any]]] = []
    for rec in proc.lines():
        if rec.get("event") == "shared training":
            spans.append((_ts(rec), None, rec))
        elif rec.get("event") == "shared run" and spans and spans[-1][1] is None:
            start, _, first = spans[-1]
            spans[-1] = (start, _ts(rec), first)
    return spans


def _events(per_segment: int, skip: int = 0, n_segments: int = 24) -> list[ClickEvent]:
    """Events `skip`..`skip + per_segment` of each of `n_segments` brands (enough segments that every
    partition holds some), in stream order."""
    stream = [e for e in load_homedepot().stream() if e.segment not in ("unknown", "Unbranded")]
    totals: dict[str, int] = {}
    for e in stream:
        totals[e.segment] = totals.get(e.segment, 0) + 1
    chosen = set(sorted(seg for seg, n in totals.items() if n >= 40)[:n_segments])
    counts: dict[str, int] = {}
    out = []
    for e in stream:
        if e.segment in chosen:
            if skip <= counts.get(e.segment, 0) < skip + per_segment:
                out.append(e)
            counts[e.segment] = counts.get(e.segment, 0) + 1
    return out


def test_one_shared_trainer_per_group_on_every_partition_and_it_fails_over(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"topic_partitions": PARTITIONS})
    ensure_topics(s, [s.input_topic, s.versions_topic, s.scores_topic])
    env = worker_env(s, GROUP)
    procs = [WorkerProc(env, tmp_path / f"w{i}.log", name=f"w{i}") for i in range(2)]
    versions = TopicReader(s, s.versions_topic)
    try:
        for p in procs:
            p.wait_for_event("starting", 120)
        holder = _settled_holder(procs, 180)
        other = next(p for p in procs if p is not holder)
        produce_events(s, _events(12), restamp=True)
        holder.wait_for_event("shared run", 300)
        shared = versions.until(lambda seen: any(v["scope"] == "shared" for v in seen), 60)
        assert other.owned() and holder.owned(), "both workers own input partitions"
        start = next(r for r in holder.lines() if r.get("event") == "shared training")
        assert sorted(start["partitions"]) == list(range(PARTITIONS)), "events of every partition"
        assert not _spans(other), "the worker without the lease never trains the shared model"
        champion = [v for v in shared if v["scope"] == "shared" and v["decision"] == "promoted"]
        assert champion

        holder.kill()
        other.wait_for(lambda r: _holds(other), 120)
        produce_events(s, _events(12, skip=12), restamp=True)
        other.wait_for_event("shared run", 300)
        after = versions.until(
            lambda seen: (
                len([v for v in seen if v["scope"] == "shared"])
                >= len([v for v in shared if v["scope"] == "shared"]) + 1
            ),
            60,
        )
        runs = [v for v in after if v["scope"] == "shared"]
        numbers = [v["version"] for v in runs]
        assert len(set(numbers)) == len(numbers), "versions never reused"
        survivor_run = runs[-1]
        promoted_before = [v["version"] for v in runs[:-1] if v["decision"] == "promoted"]
        assert survivor_run["parent_version"] == promoted_before[-1], "continues from the champion"
        spans = sorted((start, end) for p in procs for start, end, _ in _spans(p) if end is not None)
        for (_, end_a), (start_b, _) in itertools.pairwise(spans):
            assert end_a is not None and end_a <= start_b, "two shared trainings overlapped"
        assert other.terminate() == 0
    finally:
        for p in procs:
            p.kill()


def _holds(proc: WorkerProc) -> bool:
    """Whether the process holds the lease now, replayed from its acquired / released / lost lines."""
    held = False
    for rec in proc.lines():
        event = str(rec.get("event", ""))
        if event.startswith("shared trainer: lease"):
            held = event == "shared trainer: lease acquired"
    return held


def _settled_holder(procs: list[WorkerProc], timeout_s: float) -> WorkerProc:
    """Once both workers own input partitions: the one process holding the lease (never two)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        holders = [p for p in procs if p.alive() and _holds(p)]
        assert len(holders) <= 1, "two workers hold the lease at once"
        if holders and all(p.owned() for p in procs):
            time.sleep(2.0)
            if [p for p in procs if _holds(p)] == holders:
                return holders[0]
        time.sleep(0.2)
    raise AssertionError("no worker took the lease:\n" + "\n".join(p.tail() for p in procs))


def test_scores_of_a_promotion_arrive_after_a_restart_and_its_events_train_once(
    settings: Settings, tmp_path: Path
) -> None:
    """A crash between a shared promotion and the refreshed scores leaves the promotion recorded and the
    partitions' `served` markers behind it (emulated here by resetting them after a clean stop). The
    restarted worker publishes those scores, and its shared trainer takes none of the already trained
    events as new: no second shared run on them."""
    s = settings.model_copy(update={"topic_partitions": 2})
    ensure_topics(s, [s.input_topic, s.versions_topic, s.scores_topic])
    env = worker_env(s, {**GROUP, "topic_partitions": 2, "shared_every": 250})
    first = WorkerProc(env, tmp_path / "first.log", name="first")
    versions = TopicReader(s, s.versions_topic)
    try:
        produce_events(s, _events(12), restamp=True)
        first.wait_for_event("shared run", 300)
        promoted = versions.until(
            lambda seen: any(v["scope"] == "shared" and v["decision"] == "promoted" for v in seen), 60
        )
        champion = next(v["version"] for v in promoted if v["scope"] == "shared")
        assert first.terminate() == 0
    finally:
        first.kill()
    buffer = Buffer(s)
    assert all(buffer.scores_shared_version(p) == champion for p in range(2))
    for p in range(2):
        buffer.mark_scores_shared_version(p, 0)
    segments = {seg for p in range(2) for seg in buffer.segments(p)}

    scores = TopicReader(s, s.scores_topic)
    restarted = datetime.now(UTC)
    again = WorkerProc(env, tmp_path / "again.log", name="again")
    try:

        def refreshed(seen: list[dict[str, Any]]) -> set[str]:
            return {
                x["segment"]
                for x in seen
                if x["shared_version"] == champion and _ts({"timestamp": x["scored_at"]}) >= restarted
            }

        scores.until(lambda seen: refreshed(seen) >= segments, 180)
        assert all(buffer.scores_shared_version(p) == champion for p in range(2))
        again.wait_for_event("shared trainer: lease acquired", 60)
        time.sleep(8)
        assert not [r for r in again.lines() if r.get("event") == "shared training"], (
            "events a shared run had taken were taken again after the restart"
        )
        assert again.terminate() == 0
    finally:
        again.kill()


GATE_DEFAULTS = {
    name: Settings.model_fields[name].default
    for name in ("gate_auc_tolerance", "gate_logloss_margin", "gate_min_holdout", "shared_min_holdout")
}
"""The gate as a user gets it (worker_helpers.SMALL opens it for the other tests)."""
THREE: dict[str, object] = {
    **GROUP,
    **GATE_DEFAULTS,
    "topic_partitions": 6,
    "shared_bootstrap_min_events": 3000,
    "shared_every": 1500,
    "shared_holdout_frac": 0.1,
    "min_new_events": 120,
    "adapter_lr": 1e-3,
}
"""The first shared run waits for the whole first batch (3,000 events: over 600 pooled held-out pairs
at 10 % with the unseen-query slice, the gate needs 200); every segment (about 190 events each) then
trains an adapter on it before the next 1,500 events, which make the second shared run due and no
segment due again."""


def _nth_start(proc: WorkerProc, n: int, timeout_s: float) -> dict[str, Any]:
    """The process's `n`-th "shared training" record (1-based), once it is logged."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        starts = [r for r in proc.lines() if r.get("event") == "shared training"]
        if len(starts) >= n:
            return starts[n - 1]
        assert proc.alive(), f"{proc.name} exited early:\n{proc.tail()}"
        time.sleep(0.05)
    raise AssertionError(f"{proc.name}: no shared training #{n} in {timeout_s} s:\n{proc.tail()}")


def test_three_workers_six_partitions_gate_at_defaults_and_the_trainer_killed_mid_run(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(update={"topic_partitions": 6})
    ensure_topics(s, [s.input_topic, s.versions_topic, s.scores_topic])
    env = worker_env(s, THREE)
    procs = [WorkerProc(env, tmp_path / f"w{i}.log", name=f"w{i}") for i in range(3)]
    versions = TopicReader(s, s.versions_topic)
    scores = TopicReader(s, s.scores_topic)
    stream = shop.generate(events=4500, segments=16, seed=7)
    try:
        for p in procs:
            p.wait_for_event("starting", 180)
        holder = _settled_holder(procs, 240)
        produce_events(s, stream[:3000], restamp=True)
        first = _nth_start(holder, 1, 300)
        assert first["events"] == 3000, "the first run waits for the bootstrap minimum, group-wide"
        assert sorted(first["partitions"]) == list(range(6)), "events of every partition"
        holder.wait_for_event("shared run", 600)
        seen = versions.until(lambda vs: any(v["scope"] == "shared" for v in vs), 60)
        bootstrap = next(v for v in seen if v["scope"] == "shared")
        assert bootstrap["decision"] == "promoted", (
            f"the shop's first shared model beats zero-shot: {bootstrap}"
        )
        assert bootstrap["challenger"]["n"] >= GATE_DEFAULTS["shared_min_holdout"]

        segments = {e.segment for e in stream[:3000]}
        versions.until(lambda vs: {v["segment"] for v in vs if v["scope"] == "segment"} >= segments, 600)
        produce_events(s, stream[3000:], restamp=True)
        killed = _nth_start(holder, 2, 300)
        holder.kill()
        assert not [r for r in holder.lines() if r.get("event") == "shared run"][1:], (
            "killed before its second run ended"
        )
        survivors = [p for p in procs if p is not holder]
        successor = _settled_holder(survivors, 180)
        resumed = _nth_start(successor, 1, 300)
        assert resumed["events"] >= killed["events"], "the killed run's new events are trained, not lost"
        successor.wait_for_event("shared run", 600)
        seen = versions.until(lambda vs: len([v for v in vs if v["scope"] == "shared"]) >= 2, 60)
        runs = [v for v in seen if v["scope"] == "shared"]
        assert len(runs) == 2, "the killed run recorded nothing"
        assert runs[1]["version"] == runs[0]["version"] + 1, "versions never skipped nor reused"
        assert runs[1]["parent_version"] == bootstrap["version"], "continues from the champion"
        for (_, end_a), (start_b, _) in itertools.pairwise(
            sorted((a, b) for p in procs for a, b, _ in _spans(p) if b is not None)
        ):
            assert end_a is not None and end_a <= start_b, "two shared trainings overlapped"
        trainers = {p.name for p in procs if [r for r in p.lines() if r.get("event") == "shared training"]}
        assert trainers == {holder.name, successor.name}, "only lease holders train the shared model"

        segment_runs = [v for v in versions.until(lambda vs: False, 5) if v["scope"] == "segment"]
        champions = _champion_chain(runs)
        for v in runs + segment_runs:
            if v["decision"] == "promoted" and v["scope"] == "shared":
                assert v["version"] in champions, f"announced as promoted, never champion: {v}"
        gated_on = {
            (v["segment"], v["version"]): v["shared_version"]
            for v in segment_runs
            if v["decision"] == "promoted"
        }
        assert gated_on, "some adapter was promoted through the default gate"
        assert {v["shared_version"] for v in segment_runs} <= champions
        scored = scores.until(lambda xs: any(x["model_version"] for x in xs), 60)
        for x in scored:
            assert x["shared_version"] in champions | {0}
            if x["model_version"]:
                assert gated_on[(x["segment"], x["model_version"])] == x["shared_version"], (
                    "an adapter serves only on the shared version it was gated on"
                )
        for p in survivors:
            assert p.terminate() == 0
    finally:
        for p in procs:
            p.kill()


def _champion_chain(shared_runs: list[dict[str, Any]]) -> set[int]:
    """Versions that became champion: each promoted run's parent is the champion before it."""
    chain: list[int] = []
    for v in shared_runs:
        if v["decision"] == "promoted":
            assert v["parent_version"] == (chain[-1] if chain else None), f"gated on a stale champion: {v}"
            chain.append(v["version"])
    return set(chain)
