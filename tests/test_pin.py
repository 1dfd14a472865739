"""An operator's pin holds through real worker processes, Kafka and Redis.

A segment trains an adapter, then is pinned to zero-shot from the CLI: the worker publishes a `pinned`
model-version event and the segment's scores again, now zero-shot's. A second worker joins (a rebalance)
and the first leaves, so the second owns the partitions; the segment's next training, which the opened
gate would promote, is recorded as rejected ("pinned") and score requests are answered by zero-shot.
After a restart (a third process) the pin still holds; unpinning returns the segment to its adapter.

A segment pinned to `shared` stays on that shared version after a newer one is promoted: the worker loads
the older one from the model store (`Learner._pinned_model`) and publishes the segment's scores as that
version's, while the other segments move to the new one; unpinning moves the segment there too."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from worker_helpers import TopicReader, WorkerProc, few_of_others, in_stream_order, worker_env

from worker.config import Settings
from worker.events import ClickEvent, ScorePair, ScoreRequest
from worker.learn.backbone import Backbone, load_backbone
from worker.learn.scoring import score_pairs
from worker.learn.serving import served_copy
from worker.learn.store import load_shared
from worker.learn.train import score_segment
from worker.state.buffer import Buffer, Candidate
from worker.state.registry import SHARED_SEGMENT, Registry
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
        assert back and {(s["model_version"], s["shared_version"], s["served_by"]) for s in back} == {
            (adapter["version"], shared_version, "adapter")
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


OLDER = {"min_new_events": 24, "shared_every": 150}


def _older_stream() -> tuple[list[ClickEvent], list[ClickEvent]]:
    """The pinned segment's first 30 events (one training) and others' for the first shared run; then
    only others' events, enough for a second shared run. No other segment reaches `min_new_events`."""
    stream = load_homedepot().stream()
    first = in_stream_order(
        [e for e in stream if e.segment == PINNED][:30] + few_of_others(stream, PINNED, 8, 200)
    )
    taken = {e.event_id for e in first}
    second = few_of_others([e for e in stream if e.event_id not in taken], PINNED, 8, 200)
    return first, second


def _shared_scores(
    settings: Settings, backbone: Backbone, version: int, candidates: list[Candidate]
) -> dict[tuple[str | None, str], float]:
    """What shared `version` scores the candidates, loaded from the model store as a pin loads it."""
    record = Registry.from_settings(settings).shared().get(SHARED_SEGMENT, version)
    assert record is not None and record.adapter is not None
    model, _ = load_shared(Path(record.adapter), backbone)
    served = served_copy(model.eval(), None, settings.scoring_precision == "int8")
    probs = score_pairs(backbone, served, [(c.query, c.item_text) for c in candidates])
    return {(c.query, c.item_id): float(p) for c, p in zip(candidates, probs, strict=True)}


def _pinned_refreshes(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pinned segment's refreshed scores in the order the worker published them (one partition)."""
    return [s for s in seen if s["segment"] == PINNED and s["request_id"] is None]


def _by(scores: list[dict[str, Any]], versions: tuple[int, int]) -> dict[tuple[str | None, str], float]:
    """Scores stamped (model version, shared version) = `versions`, by (query, item id)."""
    return {
        (s["query"], s["item_id"]): s["score"]
        for s in scores
        if (s["model_version"], s["shared_version"]) == versions
    }


def test_a_segment_pinned_to_shared_stays_on_that_version_after_a_newer_one_is_promoted(
    settings: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    first, second = _older_stream()
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    worker = WorkerProc(worker_env(settings, OLDER), tmp_path / "worker.log")
    procs.append(worker)
    assert produce_events(settings, first, restamp=True) == len(first)
    versions = TopicReader(settings, settings.versions_topic)
    scores = TopicReader(settings, settings.scores_topic)

    def shared_promoted(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [v for v in seen if v["scope"] == "shared" and v["decision"] == "promoted"]

    try:
        seen = versions.until(lambda seen: bool(shared_promoted(seen) and _versions(seen, "promoted")), 420)
        [adapter] = _versions(seen, "promoted")
        [v1] = [v["version"] for v in shared_promoted(seen)]
        assert adapter["shared_version"] == v1
        buffer = Buffer(settings)
        partitions = range(partition_count(settings, settings.input_topic))
        [partition] = [p for p in partitions if PINNED in buffer.segments(p)]
        candidates = buffer.candidates(partition, PINNED)
        backbone = load_backbone(settings.model_copy(update={"max_seq_len": 16}))
        on_v1 = _shared_scores(settings, backbone, v1, candidates)

        own = (adapter["version"], v1)
        seen_scores = scores.until(lambda seen: set(_by(_pinned_refreshes(seen), own)) >= set(on_v1), 60)
        mark = len(_pinned_refreshes(seen_scores))
        assert set(_by(_pinned_refreshes(seen_scores), own)) >= set(on_v1), worker.tail()

        pinned = _models(settings, "pin", PINNED, "shared", "--reason", "hold on v1")
        assert pinned.returncode == 0, pinned.stderr
        assert f"pinned to shared v{v1}" in pinned.stdout
        seen_scores = scores.until(
            lambda seen: set(_by(_pinned_refreshes(seen)[mark:], (0, v1))) >= set(on_v1), 60
        )
        at_pin = _by(_pinned_refreshes(seen_scores)[mark:], (0, v1))
        assert set(at_pin) >= set(on_v1), worker.tail()
        for item, score in on_v1.items():
            assert at_pin[item] == pytest.approx(score, abs=1e-5)
        mark = len(_pinned_refreshes(seen_scores))

        assert produce_events(settings, second, restamp=True) == len(second)
        seen = versions.until(lambda seen: len(shared_promoted(seen)) == 2, 420)
        assert len(shared_promoted(seen)) == 2, worker.tail()
        newer = shared_promoted(seen)[1]
        v2 = newer["version"]
        on_v2 = _shared_scores(settings, backbone, v2, candidates)
        assert max(abs(on_v1[item] - on_v2[item]) for item in on_v1) > 1e-3, "v1 and v2 must score apart"

        def others(seen: list[dict[str, Any]], shared_version: int) -> set[tuple[str, str | None, str]]:
            return {
                (s["segment"], s["query"], s["item_id"])
                for s in seen
                if s["segment"] != PINNED and s["shared_version"] == shared_version
            }

        on_v1_before = others(seen_scores, v1)
        seen_scores = scores.until(
            lambda seen: (
                len(_pinned_refreshes(seen)) - mark >= len(on_v1) and others(seen, v2) >= on_v1_before
            ),
            300,
        )
        after = _pinned_refreshes(seen_scores)[mark:]
        assert len(after) >= len(on_v1), worker.tail()
        assert on_v1_before and others(seen_scores, v2) >= on_v1_before, "the others moved to v2"
        promoted_at = datetime.fromisoformat(newer["created_at"])
        assert all(datetime.fromisoformat(s["scored_at"]) >= promoted_at for s in after), (
            "refreshed for the newer shared version's promotion"
        )
        assert {(s["model_version"], s["shared_version"]) for s in after} == {(0, v1)}, worker.tail()
        kept = _by(after, (0, v1))
        assert set(kept) >= set(on_v1)
        for item, score in on_v1.items():
            assert kept[item] == pytest.approx(score, abs=1e-5)
        mark = len(_pinned_refreshes(seen_scores))

        unpinned = _models(settings, "unpin", PINNED)
        assert unpinned.returncode == 0, unpinned.stderr
        seen_scores = scores.until(
            lambda seen: set(_by(_pinned_refreshes(seen)[mark:], (0, v2))) >= set(on_v2), 120
        )
        back = _pinned_refreshes(seen_scores)[mark:]
        assert {(s["model_version"], s["shared_version"]) for s in back} == {(0, v2)}, worker.tail()
        moved = _by(back, (0, v2))
        assert set(moved) >= set(on_v2), "its adapter was gated on v1, so v2 alone serves it"
        for item, score in on_v2.items():
            assert moved[item] == pytest.approx(score, abs=1e-5)
        assert worker.terminate() == 0
    finally:
        versions.close()
        scores.close()
