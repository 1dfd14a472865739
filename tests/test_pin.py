"""An operator's pin holds through real worker processes, Kafka and Redis.

A segment trains an adapter, then is pinned to zero-shot from the CLI: the worker publishes a `pinned`
model-version event and the segment's scores again, now zero-shot's. A second worker joins (a rebalance)
and the first leaves, so the second owns the partitions; the segment's next training, which the opened
gate would promote, is recorded as rejected ("pinned") and score requests are answered by zero-shot.
After a restart (a third process) the pin still holds; unpinning returns the segment to its adapter."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from worker_helpers import TopicReader, WorkerProc, few_of_others, in_stream_order, worker_env

from worker.config import Settings
from worker.events import ClickEvent, ScorePair, ScoreRequest
from worker.learn.backbone import load_backbone
from worker.learn.train import score_segment
from worker.state.buffer import Buffer, Candidate
from worker.state.registry import Registry
from worker.stream.kafka import client_config, ensure_topics, partition_count
from worker.tools.datasets import load_homedepot
from worker.tools.replay import produce_events

pytestmark = pytest.mark.integration

PINNED = "GE"
OVERRIDES = {"min_new_events": 24}


def _stream() -> tuple[list[ClickEvent], list[ClickEvent]]:
    """The pinned segment's first 40 events and others' (at most 8 a segment, so none of them trains),
    enough for the shared model's first run; and 30 more of the pinned segment's for a later training."""
    stream = load_homedepot().stream()
    pinned = [e for e in stream if e.segment == PINNED][:70]
    first = in_stream_order(pinned[:40] + few_of_others(stream, PINNED, 8, 200))
    return first, pinned[40:]


def _models(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "models", *argv],
        env=worker_env(settings, OVERRIDES),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _request(settings: Settings, candidates: list[Candidate]) -> str:
    request_id = uuid.uuid4().hex
    pairs = [ScorePair(query=c.query, item_id=c.item_id, item_text=c.item_text) for c in candidates]
    producer = Producer(client_config(settings))
    request = ScoreRequest(request_id=request_id, segment=PINNED, pairs=pairs)
    producer.produce(settings.requests_topic, key=PINNED.encode(), value=request.model_dump_json().encode())
    producer.flush(30)
    return request_id


def _versions(seen: list[dict[str, Any]], decision: str | None = None) -> list[dict[str, Any]]:
    return [
        v
        for v in seen
        if v["segment"] == PINNED and v["scope"] == "segment" and decision in (None, v["decision"])
    ]


def test_a_pin_holds_across_a_rebalance_a_promotion_and_a_restart(
    settings: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    first, later = _stream()
    ensure_topics(
        settings,
        [settings.input_topic, settings.versions_topic, settings.scores_topic, settings.requests_topic],
    )
    log = tmp_path / "worker.log"
    a = WorkerProc(worker_env(settings, OVERRIDES), log, name="a")
    procs.append(a)
    assert produce_events(settings, first, restamp=True) == len(first)
    versions = TopicReader(settings, settings.versions_topic)
    scores = TopicReader(settings, settings.scores_topic)
    try:
        seen = versions.until(lambda seen: bool(_versions(seen, "promoted")), 240)
        [adapter] = _versions(seen, "promoted")
        shared_version = adapter["shared_version"]

        buffer = Buffer(settings)
        partitions = range(partition_count(settings, settings.input_topic))
        [partition] = [p for p in partitions if PINNED in buffer.segments(p)]
        candidates = buffer.candidates(partition, PINNED)
        backbone = load_backbone(settings.model_copy(update={"max_seq_len": 16}))
        pairs = [(c.query, c.item_text) for c in candidates]
        zero = dict(
            zip(
                [(c.query, c.item_id) for c in candidates],
                score_segment(backbone, None, None, pairs),
                strict=True,
            )
        )

        pinned = _models(settings, "pin", PINNED, "zero-shot", "--reason", "adapter under review")
        assert pinned.returncode == 0, pinned.stderr

        def zero_shot_scores(seen: list[dict[str, Any]]) -> dict[tuple[str | None, str], float]:
            return {
                (s["query"], s["item_id"]): s["score"]
                for s in seen
                if s["segment"] == PINNED and s["shared_version"] == 0 and s["request_id"] is None
            }

        seen_scores = scores.until(lambda seen: set(zero_shot_scores(seen)) >= set(zero), 60)
        published = zero_shot_scores(seen_scores)
        assert set(published) >= set(zero), a.tail()
        for item, score in zero.items():
            assert published[item] == pytest.approx(float(score), abs=1e-5)
        seen = versions.until(lambda seen: bool(_versions(seen, "pinned")), 30)
        [event] = _versions(seen, "pinned")
        assert event["pinned"]["kind"] == "zero_shot" and event["pinned"]["reason"] == "adapter under review"
        assert event["serving"]["reason"].startswith("pinned to zero-shot")

        b = WorkerProc(worker_env(settings, OVERRIDES), log, name="b")
        procs.append(b)
        b.wait_for_event("assigned", 90)
        assert a.terminate() == 0
        assert produce_events(settings, later, restamp=True) == len(later)
        seen = versions.until(lambda seen: len(_versions(seen, "rejected")) > 0, 180)
        [refused] = _versions(seen, "rejected")
        assert refused["reason"].startswith("pinned:"), refused
        assert Registry.from_settings(settings).champion_version(PINNED) == adapter["version"]
        assert b.owned() == set(partitions), "the second worker took every partition"

        asked = _request(settings, candidates[:6])
        seen_scores = scores.until(lambda seen: any(s["request_id"] == asked for s in seen), 60)
        answers = [s for s in seen_scores if s["request_id"] == asked]
        assert len(answers) == 6, b.tail()
        for s in answers:
            assert (s["model_version"], s["shared_version"]) == (0, 0)
            assert s["score"] == pytest.approx(float(zero[s["query"], s["item_id"]]), abs=1e-5)
        assert b.terminate() == 0

        c = WorkerProc(worker_env(settings, OVERRIDES), log, name="c")
        procs.append(c)
        asked = _request(settings, candidates[:6])
        seen_scores = scores.until(lambda seen: any(s["request_id"] == asked for s in seen), 90)
        assert {
            (s["model_version"], s["shared_version"]) for s in seen_scores if s["request_id"] == asked
        } == {(0, 0)}, c.tail()

        before = len(seen_scores)
        unpinned = _models(settings, "unpin", PINNED)
        assert unpinned.returncode == 0, unpinned.stderr

        def adapter_scores(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [s for s in seen[before:] if s["segment"] == PINNED and s["request_id"] is None]

        seen_scores = scores.until(lambda seen: len(adapter_scores(seen)) >= len(candidates), 60)
        back = adapter_scores(seen_scores)
        assert back and {(s["model_version"], s["shared_version"]) for s in back} == {
            (adapter["version"], shared_version)
        }, c.tail()
        assert any(
            abs(s["score"] - float(zero[s["query"], s["item_id"]])) > 1e-3
            for s in back
            if (s["query"], s["item_id"]) in zero
        )
        seen = versions.until(lambda seen: bool(_versions(seen, "unpinned")), 30)
        assert _versions(seen, "unpinned"), c.tail()
        assert c.terminate() == 0
    finally:
        versions.close()
        scores.close()
