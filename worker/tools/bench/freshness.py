"""`python -m worker bench freshness`: from a triggering click to refreshed scores a consumer can read.

End to end, against the local stack and a real `python -m worker run` process: each round produces
`--events` clicks of one segment (the last one triggers a training), then measures from that last click's
produce time to (a) the model-version event and (b) the last refreshed score of that version, both as read
by a Kafka consumer. Raw cost: the same training and scoring (`train_segment_adapter` + scoring the same
candidates) as plain function calls in this process, right after each end-to-end round (while the worker
idles), so both see the same machine load. `ratio = e2e_scores_p50_s / raw_p50_s`.

The gate is opened (every challenger is promoted) because a rejected version publishes no scores; this
measures latency, not quality. `--raw-only` measures just the trainer and scorer (no Kafka), e.g. on a GPU
machine: `--raw-only --events 512 --candidates 10000`.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.tools.datasets import load_homedepot
from worker.tools.procs import child_env, start_worker, stop_worker
from worker.tools.run_settings import isolated

SEGMENT = "GE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="measured trainings")
    parser.add_argument("--events", type=int, default=32, help="events per round (= WORKER_MIN_NEW_EVENTS)")
    parser.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    parser.add_argument("--raw-only", action="store_true", help="only the in-process trainer + scorer")
    parser.add_argument("--candidates", type=int, default=0, help="--raw-only: candidates to score")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def _segment_events(n: int) -> list[ClickEvent]:
    stream = load_homedepot().stream()
    mine = [e for e in stream if e.segment == SEGMENT]
    if len(mine) < n:
        mine = [
            e.model_copy(update={"event_id": f"{e.event_id}-r{i}"})
            for i in range(n // len(mine) + 1)
            for e in mine
        ]
    return mine[:n]


def _pairs(events: list[ClickEvent]) -> list[tuple[str | None, str]]:
    return list(dict.fromkeys((e.query, e.item_text) for e in events))


def raw_round(
    settings: Settings,
    backbone: Any,
    shared: Any,
    champion: Any,
    new: list[ClickEvent],
    older: list[ClickEvent],
    candidates: list[tuple[str | None, str]],
) -> tuple[float, Any]:
    """One training + scoring as plain calls; returns seconds and the new adapter."""
    from worker.learn.adapters import with_adapter
    from worker.learn.scoring import score_pairs
    from worker.learn.train import train_segment_adapter
    from worker.learn.training_data import segment_training_data

    start = time.perf_counter()
    data = segment_training_data(new, older, settings, len(older) + len(new))
    result = train_segment_adapter(
        backbone, shared, champion, data.new, data.replay, data.holdout, settings, unseen=data.unseen
    )
    model = with_adapter(shared, result.adapter) if result.adapter is not None else shared
    score_pairs(backbone, model, candidates)
    return time.perf_counter() - start, result.adapter


def _raw_only(args: argparse.Namespace) -> dict[str, Any]:
    from worker.learn.backbone import load_backbone
    from worker.learn.click_model import new_click_model

    opened = {"gate_auc_tolerance": 1.0, "gate_logloss_margin": 1000.0, "gate_min_holdout": 1}
    settings = load_settings().model_copy(update=opened)
    backbone = load_backbone(settings)
    shared = new_click_model(backbone, settings.seed)
    events = _segment_events(args.events * (args.rounds + 1))
    candidates = _pairs(events)
    while len(candidates) < args.candidates:
        candidates += [
            (q, f"{t} #{len(candidates)}") for q, t in candidates[: args.candidates - len(candidates)]
        ]
    candidates = candidates[: args.candidates or len(candidates)]
    times, champion = [], None
    for r in range(args.rounds + 1):
        new = events[r * args.events : (r + 1) * args.events]
        seconds, champion = raw_round(
            settings, backbone, shared, champion, new, events[: r * args.events], candidates
        )
        if r > 0:
            times.append(seconds)
        print(f"raw round {r}: {seconds:.3f} s", file=sys.stderr)
    return {
        "mode": "raw-only",
        "device": str(backbone.device),
        "events_per_round": args.events,
        "candidates": len(candidates),
        "raw_p50_s": _pct(times, 50),
        "raw_p95_s": _pct(times, 95),
        "raw_rounds_s": times,
    }


class _TopicLog(threading.Thread):
    """Reads a topic from the start in the background, noting each record's arrival time."""

    def __init__(self, settings: Settings, topic: str) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer

        from worker.stream.kafka import client_config

        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
            }
        )
        self.consumer.subscribe([topic])
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for msg in self.consumer.consume(1000, 0.05):
                value = msg.value()
                if msg.error() is None and value is not None:
                    arrived = time.time()
                    with self.lock:
                        self.records.append((arrived, orjson.loads(value)))
        self.consumer.close()

    def wait(self, match: Any, count: int, timeout_s: float) -> float:
        """Arrival time of the `count`-th matching record."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                hits = [t for t, rec in self.records if match(rec)]
            if len(hits) >= count:
                return sorted(hits)[count - 1]
            time.sleep(0.02)
        raise TimeoutError(f"only {len(hits)} of {count} records within {timeout_s} s")


def _e2e(args: argparse.Namespace) -> dict[str, Any]:
    from confluent_kafka import Producer

    from worker.stream.kafka import ensure_topics, producer_config

    run_id = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    settings = isolated(
        load_settings(),
        run_id,
        min_new_events=args.events,
        min_positives=1,
        min_negatives=1,
        train_cooldown_s=0.0,
        shared_every=1_000_000,
        shared_bootstrap_min_events=200,
        gate_auc_tolerance=1.0,
        gate_logloss_margin=1000.0,
        gate_min_holdout=1,
        shared_min_holdout=1,
        consume_timeout_s=0.05,
        metrics_port=0,
    )
    ensure_topics(settings, [settings.input_topic, settings.scores_topic, settings.versions_topic])
    versions = _TopicLog(settings, settings.versions_topic)
    scores = _TopicLog(settings, settings.scores_topic)
    versions.start()
    scores.start()
    worker = start_worker(child_env(settings), settings.model_store.parent / "worker.log")
    producer = Producer(producer_config(settings))
    stream = load_homedepot().stream()
    pool = [e for e in stream if e.segment != SEGMENT][:240]
    mine = _segment_events(args.events * (args.rounds + 1))
    e2e_version: list[float] = []
    e2e_scores: list[float] = []
    raw: list[float] = []
    raw_state: dict[str, Any] = {}
    try:
        for e in pool:
            producer.produce(settings.input_topic, key=e.segment.encode(), value=_stamped(e))
        producer.flush(30)
        for r in range(args.rounds + 1):
            batch = mine[r * args.events : (r + 1) * args.events]
            for e in batch[:-1]:
                producer.produce(settings.input_topic, key=SEGMENT.encode(), value=_stamped(e))
            producer.flush(30)
            t0 = time.time()
            producer.produce(settings.input_topic, key=SEGMENT.encode(), value=_stamped(batch[-1]))
            producer.flush(30)
            seq = (r + 1) * args.events
            t_version = versions.wait(
                lambda rec, seq=seq: (
                    rec["segment"] == SEGMENT and rec["scope"] == "segment" and rec["events_to"] == seq
                ),
                1,
                900 if r == 0 else 300,
            )
            with versions.lock:
                rec = next(
                    x for _, x in versions.records if x["segment"] == SEGMENT and x["events_to"] == seq
                )
            n_candidates = len({(e.query, e.item_id) for e in mine[:seq]})
            t_scores = scores.wait(lambda s, v=rec["version"]: s["model_version"] == v, n_candidates, 300)
            print(
                f"round {r}: version {rec['version']} {rec['decision']} after {t_version - t0:.3f} s, "
                f"{n_candidates} scores after {t_scores - t0:.3f} s",
                file=sys.stderr,
            )
            if r == 0:
                raw_state = _raw_start(settings)
                continue
            e2e_version.append(t_version - t0)
            e2e_scores.append(t_scores - t0)
            candidates = list(dict.fromkeys((e.query, e.item_text) for e in mine[:seq]))
            seconds, raw_state["champion"] = raw_round(
                settings,
                raw_state["backbone"],
                raw_state["shared"],
                raw_state["champion"],
                batch,
                mine[: r * args.events],
                candidates,
            )
            raw.append(seconds)
            print(f"raw round {r}: {seconds:.3f} s (worker idle meanwhile)", file=sys.stderr)
    finally:
        stop_worker(worker)
        versions.stop.set()
        scores.stop.set()

    return {
        "mode": "e2e",
        "device": str(raw_state["backbone"].device),
        "rounds": args.rounds,
        "events_per_round": args.events,
        "gate": "open (latency only)",
        "e2e_version_p50_s": _pct(e2e_version, 50),
        "e2e_version_p95_s": _pct(e2e_version, 95),
        "e2e_scores_p50_s": _pct(e2e_scores, 50),
        "e2e_scores_p95_s": _pct(e2e_scores, 95),
        "raw_p50_s": _pct(raw, 50),
        "raw_p95_s": _pct(raw, 95),
        "ratio": _pct(e2e_scores, 50) / _pct(raw, 50),
        "e2e_scores_rounds_s": e2e_scores,
        "raw_rounds_s": raw,
    }


def _raw_start(settings: Settings) -> dict[str, Any]:
    """The models the worker serves after the warm-up round, loaded here for the in-process baseline."""
    from worker.learn.backbone import load_backbone
    from worker.learn.store import load_adapter, load_shared
    from worker.state.registry import SHARED_SEGMENT, Registry

    registry = Registry.from_settings(settings)
    backbone = load_backbone(settings)
    shared_rec = registry.shared().champion(SHARED_SEGMENT)
    assert shared_rec is not None and shared_rec.adapter is not None
    shared, _ = load_shared(Path(shared_rec.adapter), backbone)
    champion_rec = registry.champion(SEGMENT)
    champion = load_adapter(Path(champion_rec.adapter))[0] if champion_rec and champion_rec.adapter else None
    return {"backbone": backbone, "shared": shared.eval(), "champion": champion}


def _stamped(e: ClickEvent) -> bytes:
    from worker.events import now_utc

    return e.model_copy(update={"ts": now_utc()}).to_json()


def cli_main(args: argparse.Namespace) -> int:
    result = _raw_only(args) if args.raw_only else _e2e(args)
    line = orjson.dumps(result).decode()
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    print(line)
    return 0
