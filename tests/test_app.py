"""The running worker end to end: real Kafka, real Redis, real `python -m worker run` processes.

The gate is opened wide here (`WORKER_GATE_AUC_TOLERANCE=1`, a huge log-loss margin) so that every
challenger is promoted and the publishing path is exercised on a small CPU budget; the gate's own
decisions are tested in test_train.py.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from worker_helpers import TopicReader, WorkerProc, in_stream_order, worker_env

from worker.config import Settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer
from worker.stream.kafka import ensure_topics, partition_count
from worker.tools.datasets import load_homedepot
from worker.tools.replay import produce_events

pytestmark = pytest.mark.integration

SEGMENTS = ("Hampton Bay", "GE")


@pytest.fixture(scope="module")
def events() -> list[ClickEvent]:
    """48 events of each test segment plus 160 events of others, so the shared model has pooled data."""
    stream = load_homedepot().stream()
    picked = [e for s in SEGMENTS for e in [x for x in stream if x.segment == s][:48]]
    others = [e for e in stream if e.segment not in SEGMENTS][:160]
    return in_stream_order(picked + others)


def _promoted(versions: list[dict[str, Any]], segment: str) -> list[dict[str, Any]]:
    return [
        v
        for v in versions
        if v["segment"] == segment and v["scope"] == "segment" and v["decision"] == "promoted"
    ]


def test_end_to_end_versions_scores_and_requests(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    worker = WorkerProc(worker_env(settings), tmp_path / "worker.log")
    procs.append(worker)
    versions = TopicReader(settings, settings.versions_topic)
    scores = TopicReader(settings, settings.scores_topic)
    assert produce_events(settings, events, restamp=True) == len(events)

    versions.until(lambda seen: all(_promoted(seen, s) for s in SEGMENTS), 300)
    for segment in SEGMENTS:
        promoted = _promoted(versions.seen, segment)
        assert promoted, f"no promoted version for {segment}: {versions.seen}"
        numbers = [v["version"] for v in versions.seen if v["segment"] == segment and v["scope"] == "segment"]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    shared = [v for v in versions.seen if v["scope"] == "shared"]
    assert shared and shared[0]["decision"] == "promoted"

    promoted_by_segment = {s: {v["version"] for v in _promoted(versions.seen, s)} for s in SEGMENTS}
    gated_on = {
        (v["segment"], v["version"]): v["shared_version"]
        for s in SEGMENTS
        for v in _promoted(versions.seen, s)
    }
    shared_promoted = {v["version"] for v in shared if v["decision"] == "promoted"}
    items = {s: {e.item_id for e in events if e.segment == s} for s in SEGMENTS}
    scores.until(lambda seen: {x["segment"] for x in seen if x["model_version"]} >= set(SEGMENTS), 60)
    for segment in SEGMENTS:
        mine = [x for x in scores.seen if x["segment"] == segment]
        assert mine, f"no scores for {segment}"
        assert all(0.0 <= x["score"] <= 1.0 for x in mine)
        assert {x["item_id"] for x in mine} <= items[segment]
        assert {x["model_version"] for x in mine} <= promoted_by_segment[segment] | {0}
        assert {x["shared_version"] for x in mine} <= shared_promoted, "scored by a promoted shared model"
        for x in mine:
            if x["model_version"]:
                assert gated_on[(segment, x["model_version"])] == x["shared_version"], (
                    "an adapter serves only on the shared version it was gated on"
                )

    request_id = f"req-{uuid.uuid4().hex[:6]}"
    pairs = [
        {"query": "ceiling fan", "item_id": "x1", "item_text": "Hampton Bay 52 in. ceiling fan"},
        {"query": "ceiling fan", "item_id": "x2", "item_text": "GE light bulb"},
    ]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(
        settings.requests_topic,
        key=b"Hampton Bay",
        value=orjson.dumps({"request_id": request_id, "segment": "Hampton Bay", "pairs": pairs}),
    )
    producer.produce(
        settings.requests_topic,
        key=b"new",
        value=orjson.dumps({"request_id": request_id + "-new", "segment": "never seen", "pairs": pairs[:1]}),
    )
    producer.flush(10)
    answered = scores.until(lambda seen: len([x for x in seen if x.get("request_id")]) >= 3, 60)
    answers = [x for x in answered if x.get("request_id") == request_id]
    assert sorted(x["item_id"] for x in answers) == ["x1", "x2"]
    assert all(x["model_version"] in promoted_by_segment["Hampton Bay"] for x in answers)
    new_segment = [x for x in answered if x.get("request_id") == request_id + "-new"]
    assert len(new_segment) == 1 and new_segment[0]["model_version"] == 0

    assert worker.terminate() == 0
    assert worker.wait_for_event("stopped", 5) is not None


def test_sigterm_during_training_then_restart(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    log = tmp_path / "worker.log"
    first = WorkerProc(worker_env(settings), log)
    procs.append(first)
    assert produce_events(settings, events, restamp=True) == len(events)
    first.wait_for_event("shared training", 120)
    started = time.monotonic()
    assert first.terminate() == 0
    assert time.monotonic() - started < 60

    second = WorkerProc(worker_env(settings), log)
    procs.append(second)
    versions = TopicReader(settings, settings.versions_topic)
    versions.until(lambda seen: all(_promoted(seen, s) for s in SEGMENTS), 300)
    assert second.terminate() == 0

    for scope_segment in [("segment", s) for s in SEGMENTS] + [("shared", "shared")]:
        numbers = [v["version"] for v in versions.seen if (v["scope"], v["segment"]) == scope_segment]
        assert numbers, scope_segment
        assert len(set(numbers)) == len(numbers), f"a version was reused: {numbers}"
        assert numbers == sorted(numbers)

    buffer = Buffer(settings)
    partitions = range(partition_count(settings, settings.input_topic))
    counted = sum(buffer.partition_stats(p).get("events", 0) for p in partitions)
    assert counted == len(events), "every event counted exactly once across the restart"


def test_second_signal_exits_at_once_and_leaves_nothing_half_written(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    from worker.learn.learner import clean_partial_dirs
    from worker.state.registry import SHARED_SEGMENT, Registry

    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    worker = WorkerProc(worker_env(settings), tmp_path / "worker.log")
    procs.append(worker)
    assert produce_events(settings, events, restamp=True) == len(events)
    worker.wait_for_event("shared training", 120)
    worker.proc.send_signal(signal.SIGTERM)
    worker.wait_for_event("signal: draining", 10)
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=10) == 130
    assert time.monotonic() - started < 5

    registry = Registry.from_settings(settings)
    for reg, segment in [(registry.shared(), SHARED_SEGMENT), *[(registry, s) for s in SEGMENTS]]:
        for rec in reg.versions(segment):
            if rec.adapter is not None:
                assert any(Path(rec.adapter).iterdir()), f"registry points at an empty dir: {rec.adapter}"
    clean_partial_dirs(settings.model_store)
    leftovers = [p for p in settings.model_store.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_health_ready_and_metrics_of_a_running_worker(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    import urllib.error
    import urllib.request

    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    worker = WorkerProc(worker_env(settings), tmp_path / "worker.log")
    procs.append(worker)
    port = worker.wait_for_event("metrics endpoint", 60)["port"]
    base = f"http://127.0.0.1:{port}"
    assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
    deadline = time.monotonic() + 60
    ready = 503
    while ready != 200 and time.monotonic() < deadline:
        try:
            ready = urllib.request.urlopen(f"{base}/readyz", timeout=5).status
        except urllib.error.HTTPError as exc:
            ready = exc.code
            time.sleep(0.5)
    assert ready == 200
    assert produce_events(settings, events[:50], restamp=True) == 50
    deadline = time.monotonic() + 60
    text = ""
    while "ctr_worker_events_consumed_total 50.0" not in text and time.monotonic() < deadline:
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        time.sleep(0.5)
    assert "ctr_worker_events_consumed_total 50.0" in text
    assert worker.terminate() == 0
