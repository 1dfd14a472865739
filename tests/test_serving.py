"""Each segment is served by what its own evidence says is not worse: a real worker, Kafka and Redis.

One segment's clicks follow zero-shot's ranking exactly, so the shared model, trained mostly on the
other segments' events, ranks it worse: after its training the segment is served by zero-shot (the
model-version event says so), its published scores are zero-shot's, and a second worker process that
takes over its partitions after a restart still answers it with zero-shot, while the shared model
serves the others. Adapters are kept out (`gate_min_holdout`) so that the serving choice alone decides;
the choice is made on unseen queries' pairs, so more of the few queries are kept unseen."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Producer
from worker_helpers import TopicReader, WorkerProc, few_of_others, in_stream_order, read_all, worker_env

from worker.config import Settings
from worker.events import ClickEvent, ScorePair, ScoreRequest
from worker.learn.backbone import load_backbone
from worker.learn.train import score_segment
from worker.learn.training_data import pairs_of
from worker.state.buffer import Buffer
from worker.stream.kafka import client_config, ensure_topics, partition_count
from worker.tools.datasets import load_homedepot
from worker.tools.replay import produce_events

pytestmark = pytest.mark.integration

HARMED = "GE"
OVERRIDES = {
    "gate_min_holdout": 100000,
    "max_seq_len": 16,
    "serving_choice": True,
    "unseen_query_frac": 0.4,
}


def _stream(settings: Settings) -> tuple[list[ClickEvent], Any]:
    """GE's first 96 events labelled by zero-shot's own ranking (clicked above its median), and other
    brands' events, at most 10 each, so that no other segment trains and all follow the shared model."""
    backbone = load_backbone(settings.model_copy(update={"max_seq_len": 16}))
    stream = load_homedepot().stream()
    harmed = [e for e in stream if e.segment == HARMED][:96]
    zero = score_segment(backbone, None, None, pairs_of(harmed))
    cut = float(np.median(zero))
    harmed = [e.model_copy(update={"clicked": int(p > cut)}) for e, p in zip(harmed, zero, strict=True)]
    events = in_stream_order(harmed + few_of_others(stream, HARMED, 10, 260))
    return events, backbone


def _request(settings: Settings, segment: str, pairs: list[tuple[str | None, str, str]]) -> str:
    request_id = uuid.uuid4().hex
    request = ScoreRequest(
        request_id=request_id,
        segment=segment,
        pairs=[ScorePair(query=q, item_id=i, item_text=t) for q, i, t in pairs],
    )
    producer = Producer(client_config(settings))
    producer.produce(settings.requests_topic, key=segment.encode(), value=request.model_dump_json().encode())
    producer.flush(30)
    return request_id


def test_a_segment_the_shared_model_serves_worse_stays_on_zero_shot_across_a_restart(
    settings: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    events, backbone = _stream(settings)
    topics = [settings.input_topic, settings.versions_topic, settings.scores_topic, settings.requests_topic]
    ensure_topics(settings, topics)
    log = tmp_path / "worker.log"
    first = WorkerProc(worker_env(settings, OVERRIDES), log, name="first")
    procs.append(first)
    assert produce_events(settings, events, restamp=True) == len(events)

    def chosen(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [v for v in seen if v["segment"] == HARMED and v["scope"] == "segment" and v.get("serving")]

    versions = TopicReader(settings, settings.versions_topic)
    try:
        seen = versions.until(lambda seen: bool(chosen(seen)), 420)
    finally:
        versions.close()
    assert chosen(seen), first.tail()
    event = chosen(seen)[-1]
    assert event["decision"] == "rejected", "adapters are kept out: the choice alone moves the segment"
    serving = event["serving"]
    assert serving["kind"] == "zero_shot", serving
    assert serving["n"] > 0 and serving["auc"]["zero_shot"] > serving["auc"]["shared"], serving
    shared_version = next(
        v["version"] for v in seen if v["scope"] == "shared" and v["decision"] == "promoted"
    )

    buffer = Buffer(settings)
    [partition] = [
        p for p in range(partition_count(settings, settings.input_topic)) if HARMED in buffer.segments(p)
    ]
    candidates = buffer.candidates(partition, HARMED)
    zero = dict(
        zip(
            [(c.query, c.item_id) for c in candidates],
            score_segment(backbone, None, None, [(c.query, c.item_text) for c in candidates]),
            strict=True,
        )
    )

    def zero_shot_scores(seen: list[dict[str, Any]]) -> dict[tuple[str | None, str], float]:
        return {
            (s["query"], s["item_id"]): s["score"]
            for s in seen
            if s["segment"] == HARMED and s["shared_version"] == 0 and s["request_id"] is None
        }

    scores = TopicReader(settings, settings.scores_topic)
    try:
        seen_scores = scores.until(lambda seen: set(zero_shot_scores(seen)) == set(zero), 120)
    finally:
        scores.close()
    published = zero_shot_scores(seen_scores)
    assert set(published) == set(zero), "the segment's scores are refreshed when its serving changes"
    for item, score in published.items():
        assert score == pytest.approx(float(zero[item]), abs=1e-5)
    assert any(s["segment"] != HARMED and s["shared_version"] == shared_version for s in seen_scores), (
        "the shared model serves the others"
    )
    assert first.terminate() == 0

    second = WorkerProc(worker_env(settings, OVERRIDES), log, name="second")
    procs.append(second)
    other = next(e for e in events if e.segment != HARMED)
    asked = {
        HARMED: _request(settings, HARMED, [(c.query, c.item_id, c.item_text) for c in candidates[:4]]),
        other.segment: _request(settings, other.segment, [(other.query, other.item_id, other.item_text)]),
    }

    def answers(seen: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for s in seen:
            if s["request_id"] in asked.values():
                out.setdefault(s["segment"], []).append(s)
        return out

    scores = TopicReader(settings, settings.scores_topic)
    try:
        seen_scores = scores.until(lambda seen: set(answers(seen)) == set(asked), 240)
    finally:
        scores.close()
    got = answers(seen_scores)
    assert set(got) == set(asked), second.tail()
    for s in got[HARMED]:
        assert (s["shared_version"], s["model_version"], s["served_by"]) == (0, 0, "zero_shot")
        assert s["score"] == pytest.approx(float(zero[s["query"], s["item_id"]]), abs=1e-5)
    assert [(s["shared_version"], s["served_by"]) for s in got[other.segment]] == [(shared_version, "shared")]
    assert second.terminate() == 0
    recorded = read_all(settings, settings.versions_topic)
    assert [v["serving"]["kind"] for v in recorded if v["segment"] == HARMED and v.get("serving")][-1] == (
        "zero_shot"
    )
