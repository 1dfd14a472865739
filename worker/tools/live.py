"""`python -m worker eval --live`: the quality of what running workers serve, measured through Kafka.

N real `python -m worker run` processes, one consumer group on topics and Redis keys of this run's own
(`config.isolated`), take the data set's stream in order; held-out pairs are never produced. The replay
pauses at checkpoints (every K events of the slice, and at its end) until every worker has accounted for
every produced event (buffered, duplicate or dead-lettered) and has no training pending
(`ctr_worker_trainings_pending`, the queue, running trainings: all read from `/metrics`). Then every
evaluation segment's held-out pairs go out as score requests on `score-requests`, and the answers read
back from `scores` give the segment's AUC and log loss, and name the model that answered.

The slice, the held-out pairs and the settings overrides are the offline evaluation's
(`worker.tools.evaluate`), so `--compare-offline` runs the offline simulation on exactly these events.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from worker.config import Settings, isolated
from worker.events import ClickEvent, ScorePair, ScoreRequest
from worker.learn.train import labels_of, pairs_of, sample_replay, score_segment
from worker.ops.quality import HoldoutScore, holdout_score
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.stream.kafka import client_config, ensure_topics, make_producer
from worker.tools import evaluate
from worker.tools.datasets import Dataset
from worker.tools.procs import child_env, free_port, http_get, start_worker, wait_ready
from worker.tools.replay import produce_events, produce_when_room

QUICK_OVERRIDES: dict[str, object] = {"max_seq_len": 32}
"""On top of the offline quick plan's overrides: what makes 1 worker fit 20 minutes on 2 CPU cores."""
QUICK_CHECKPOINT_EVERY = 128
FULL_CHECKPOINTS = 20
"""A full run without `--checkpoint-every` pauses about this many times."""
REQUEST_PAIRS = 1000
"""Held-out pairs per score request (a request takes at most 10,000)."""
SETTLE_S = 3.0
"""An idle state must hold this long, counters unchanged, before a checkpoint is measured. Longer than
the worker's `SHARED_CHECK_S` (2 s), the period at which the shared trainer recounts the group's new
events: with 1 s, a checkpoint could be measured after the events of a due shared run had arrived and
before the trainer had counted them, so the run was not yet pending (seen on the generated shop)."""
SETTING_KEYS = (
    "max_seq_len",
    "min_new_events",
    "train_cooldown_s",
    "shared_every",
    "shared_bootstrap_min_events",
    "shared_lr",
    "adapter_epochs",
    "new_events_cap",
    "sample_cap",
    "topic_partitions",
    "base_model",
    "seed",
)


class LiveEvalError(RuntimeError):
    """A worker died, never became ready or idle, or answers did not come back in time."""


# ------------------------------------------------------------------ the slice


@dataclass(frozen=True)
class LiveSlice:
    """The events a live run produces, in order, and the held-out pairs it scores."""

    segments: list[str]
    stream: list[ClickEvent]
    holdout: dict[str, list[ClickEvent]]

    def digest(self) -> str:
        """A fingerprint of the held-out pair set: a rerun with the same data and seed gives the same."""
        h = hashlib.sha256()
        for segment in self.segments:
            h.update(segment.encode("utf-8", "surrogatepass") + b"\0")
            for event_id in sorted(e.event_id for e in self.holdout[segment]):
                h.update(event_id.encode() + b"\0")
        return h.hexdigest()

    def labelled(self, segment: str, events: int) -> int:
        return sum(1 for e in self.stream[:events] if e.segment == segment)

    def as_dataset(self) -> Dataset:
        """The slice as a data set of its own, for the offline simulation: same stream, same pairs."""
        held = [e for s in self.segments for e in self.holdout[s]]
        return Dataset(
            events=[*self.stream, *held], holdout={s: list(self.holdout[s]) for s in self.segments}
        )


def live_slice(dataset: Dataset, plan: evaluate.EvalPlan, seed: int, limit: int | None = None) -> LiveSlice:
    """The offline evaluation's slice of `dataset` under `plan` (segments, thinning, held-out cap), cut
    to its first `limit` events."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    full = dataset.stream()
    segments = evaluate._pick_segments(dataset, full, plan.segments)
    if not segments:
        raise ValueError("the data set has no evaluation segments (no held-out pairs)")
    stream = evaluate._thin_stream(full, segments, plan)
    if limit is not None:
        stream = stream[:limit]
    holdout = {
        s: (
            sample_replay(dataset.holdout[s], plan.holdout_cap, seed)
            if plan.holdout_cap
            else list(dataset.holdout[s])
        )
        for s in segments
    }
    return LiveSlice(segments, stream, holdout)


def checkpoint_positions(events: int, every: int) -> list[int]:
    """0 (before any event), every `every` events, and the end of the slice."""
    if every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1, got {every}")
    positions = list(range(0, events, every))
    return [*positions, events] if events > 0 else [0]


# ------------------------------------------------------------------ the workers


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


# ------------------------------------------------------------------ scoring through Kafka


@dataclass(frozen=True)
class Answer:
    probs: np.ndarray
    versions: set[int]
    shared: set[int] = field(default_factory=set)


class Scorer:
    """Sends score requests and reads their answers from the scores topic, every partition assigned from
    its beginning. Assigned, not subscribed: a checkpoint may wait longer than `max.poll.interval.ms` for
    the workers' trainings, and a subscribed reader would be put out of its group meanwhile and read the
    topic again from the beginning when it rejoins."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id
        self.producer: Producer = make_producer(settings)
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": f"{run_id}-eval-reader",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        topic = settings.scores_topic
        partitions = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._answers: dict[str, list[tuple[float, int, int]]] = {}

    def score(
        self,
        tag: str,
        pairs: Mapping[str, Sequence[ClickEvent]],
        timeout_s: float,
        check: Callable[[], None],
    ) -> dict[str, Answer]:
        """Scores of every segment's pairs, as the workers answer them."""
        wanted: dict[str, tuple[str, int]] = {}
        for index, (segment, events) in enumerate(pairs.items()):
            for chunk, start in enumerate(range(0, len(events), REQUEST_PAIRS)):
                part = events[start : start + REQUEST_PAIRS]
                request_id = f"{self.run_id}-{tag}-s{index}-c{chunk}"
                request = ScoreRequest(
                    request_id=request_id,
                    segment=segment,
                    pairs=[ScorePair(query=e.query, item_id=e.item_id, item_text=e.item_text) for e in part],
                )
                produce_when_room(
                    self.producer,
                    self.settings.requests_topic,
                    segment.encode("utf-8", "surrogatepass"),
                    request.to_json(),
                )
                wanted[request_id] = (segment, len(part))
        if self.producer.flush(30) > 0:
            raise LiveEvalError("score requests not acknowledged by the broker within 30 s")
        deadline = time.monotonic() + timeout_s
        while any(len(self._answers.get(r, ())) < n for r, (_, n) in wanted.items()):
            if time.monotonic() > deadline:
                missing = sum(n - len(self._answers.get(r, ())) for r, (_, n) in wanted.items())
                raise LiveEvalError(
                    f"{missing} scores of checkpoint {tag} not answered within {timeout_s:.0f} s"
                )
            check()
            self._read()
        out: dict[str, Answer] = {}
        for request_id, (segment, n) in wanted.items():
            got = self._answers.pop(request_id)[:n]
            prev = out.get(segment)
            probs = np.asarray([p for p, _, _ in got], dtype=np.float64)
            versions = {v for _, v, _ in got}
            shared = {v for _, _, v in got}
            out[segment] = (
                Answer(probs, versions, shared)
                if prev is None
                else Answer(
                    np.concatenate([prev.probs, probs]), prev.versions | versions, prev.shared | shared
                )
            )
        return out

    def _read(self) -> None:
        for msg in self.consumer.consume(1000, 0.5):
            value = msg.value()
            if msg.error() is not None or value is None:
                continue
            update = orjson.loads(value)
            request_id = update.get("request_id")
            if request_id:
                self._answers.setdefault(request_id, []).append(
                    (
                        float(update["score"]),
                        int(update["model_version"]),
                        int(update.get("shared_version") or 0),
                    )
                )

    def close(self) -> None:
        self.consumer.close()


# ------------------------------------------------------------------ the run


def _metric(m: HoldoutScore) -> tuple[float | None, float | None]:
    return m.auc, (m.logloss if math.isfinite(m.logloss) else None)


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return float(np.mean(xs)) if xs else None


def answered_by(segment_version: int, shared_version: int | None) -> str:
    """The model behind a score: the segment's adapter on a shared model, the shared model, or zero-shot."""
    if shared_version is None:
        return "zero-shot"
    if segment_version:
        return f"segment v{segment_version} on shared v{shared_version}"
    return f"shared v{shared_version}"


@dataclass(frozen=True)
class LiveOptions:
    workers: int = 1
    limit: int | None = None
    checkpoint_every: int | None = None
    compare_offline: bool = False
    ready_timeout_s: float = 300.0
    idle_timeout_s: float = 3600.0
    answer_timeout_s: float = 600.0
    stop_timeout_s: float = 180.0


def live_settings(settings: Settings, plan: evaluate.EvalPlan, quick: bool, run_id: str) -> Settings:
    """The user's settings, the plan's overrides (the offline run's), and no training cooldown unless
    `WORKER_TRAIN_COOLDOWN_S` is set: a checkpoint does not wait for one, the offline simulation has none."""
    overrides = {**plan.overrides, **(QUICK_OVERRIDES if quick else {})}
    if "train_cooldown_s" not in settings.model_fields_set:
        overrides["train_cooldown_s"] = 0.0
    return isolated(settings.model_copy(update=overrides), run_id)


def run_live(
    dataset: Dataset,
    settings: Settings,
    quick: bool,
    options: LiveOptions,
    say: Callable[[str], None] = lambda line: None,
    plan: evaluate.EvalPlan | None = None,
) -> dict[str, Any]:
    """The live evaluation; a JSON-ready dict (see the module docstring and docs/learning.md)."""
    started = time.monotonic()
    plan = plan or (evaluate.quick_plan() if quick else evaluate.full_plan())
    run_id = f"live-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    ws = live_settings(settings, plan, quick, run_id)
    if options.workers < 1 or options.workers > ws.topic_partitions:
        raise ValueError(
            f"--workers must be 1..{ws.topic_partitions} (WORKER_TOPIC_PARTITIONS), got {options.workers}"
        )
    sl = live_slice(dataset, plan, ws.seed, options.limit)
    n = len(sl.stream)
    every = options.checkpoint_every or (
        QUICK_CHECKPOINT_EVERY if quick else max(1, math.ceil(n / FULL_CHECKPOINTS))
    )
    positions = checkpoint_positions(n, every)
    shown = {k: str(getattr(ws, k)) for k in SETTING_KEYS}
    say(
        f"live evaluation {run_id}: {options.workers} worker(s), {len(sl.segments)} segments "
        f"{sl.segments}, {n} events, {sum(len(v) for v in sl.holdout.values())} held-out pairs, "
        f"checkpoints every {every} events ({len(positions)}); settings {shown}"
    )
    for note in plan.notes:
        say(f"  {note}")

    zero_shot = _zero_shot(ws, sl)
    zs_mean = _mean([zero_shot[s]["auc"] for s in sl.segments])
    say(f"zero-shot mean AUC {zs_mean}")

    restamp = any(not _fresh(e, ws) for e in sl.stream)
    ensure_topics(ws, [ws.input_topic, ws.dlq_topic, ws.scores_topic, ws.versions_topic, ws.requests_topic])
    log_dir = ws.model_store.parent
    fleet = Fleet(ws, options.workers, log_dir)
    registry = Registry.from_settings(ws)
    shared_registry = registry.shared()
    checkpoints: list[dict[str, Any]] = []
    codes: list[int | None] = []
    dead = 0
    scorer: Scorer | None = None
    producer = make_producer(ws)
    try:
        fleet.start(options.ready_timeout_s)
        say(f"{options.workers} worker(s) ready; logs in {log_dir}")
        scorer = Scorer(ws, run_id)
        produced = 0
        for index, position in enumerate(positions):
            produced += (
                produce_events(ws, sl.stream[produced:position], restamp=restamp, producer=producer)
                if position > produced
                else 0
            )
            wait_started = time.monotonic()
            loads = fleet.wait_idle(position, options.idle_timeout_s)
            dead = sum(w.dead_lettered for w in loads)
            waited = time.monotonic() - wait_started
            shared_version = shared_registry.champion_version(SHARED_SEGMENT)
            answers = scorer.score(f"k{index}", sl.holdout, options.answer_timeout_s, fleet.check_alive)
            per_segment: dict[str, dict[str, Any]] = {}
            for segment in sl.segments:
                answer = answers[segment]
                auc, ll = _metric(holdout_score(labels_of(sl.holdout[segment]), answer.probs))
                version = max(answer.versions)
                served_shared = (max(answer.shared) or None) if answer.shared else shared_version
                per_segment[segment] = {
                    "auc": auc,
                    "logloss": ll,
                    "labelled": sl.labelled(segment, position),
                    "segment_version": version,
                    "shared_version": served_shared,
                    "answered_by": answered_by(version, served_shared),
                    "mixed_versions": len(answer.versions) > 1,
                    "pairs": len(answer.probs),
                }
            mean_auc = _mean([v["auc"] for v in per_segment.values()])
            mean_ll = _mean([v["logloss"] for v in per_segment.values()])
            checkpoints.append(
                {
                    "events": position,
                    "mean_auc": mean_auc,
                    "mean_logloss": mean_ll,
                    "waited_s": round(waited, 1),
                    "per_segment": per_segment,
                }
            )
            say(
                f"checkpoint {index + 1}/{len(positions)}: {position} events, mean AUC "
                f"{_fmt(mean_auc)}, log loss {_fmt(mean_ll)}, "
                f"{answered_by(0, shared_version)} serves, waited {waited:.0f} s, "
                f"{time.monotonic() - started:.0f} s in"
            )
    finally:
        if scorer is not None:
            scorer.close()
        codes = fleet.stop(options.stop_timeout_s)
        say(f"workers stopped, exit codes {codes}")
    live_seconds = time.monotonic() - started
    result: dict[str, Any] = {
        "mode": "live",
        "quick": quick,
        "run_id": run_id,
        "workers": options.workers,
        "segments": sl.segments,
        "stream_events": n,
        "checkpoint_every": every,
        "checkpoints": positions,
        "holdout_pairs": {s: len(sl.holdout[s]) for s in sl.segments},
        "holdout_digest": sl.digest(),
        "zero_shot_mean_auc": zs_mean,
        "zero_shot": zero_shot,
        "live": checkpoints,
        "exit_codes": codes,
        "dead_lettered": dead,
        "restamped": restamp,
        "settings": {k: getattr(ws, k) for k in SETTING_KEYS},
        "notes": [
            *plan.notes,
            "live: a checkpoint is measured once every produced event is accounted for and no training "
            "is queued or running; a segment waiting out a back-off (e.g. no shared model yet) is not "
            "waited for",
            "live: segment_version is the answer's model_version (0: no adapter); shared_version is the "
            "answer's shared_version (null: zero-shot)",
        ],
        "live_seconds": round(live_seconds, 1),
    }
    if options.compare_offline:
        say("offline simulation on the same slice ...")
        result["offline"], result["offline_note"] = offline_checkpoints(sl, ws, quick, positions)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _fresh(event: ClickEvent, settings: Settings) -> bool:
    """Inside the worker's accepted window: else the replay stamps the events with their produce time
    (Home Depot has no times of its own), as `python -m worker replay` does."""
    age = time.time() - event.ts.timestamp()
    return -settings.max_clock_skew_s < age < settings.max_event_age_s


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _zero_shot(settings: Settings, sl: LiveSlice) -> dict[str, dict[str, float | None]]:
    """Each segment's held-out pairs under zero-shot cosine, computed here (the workers answer the same
    before a shared model exists: checkpoint 0 repeats it through Kafka)."""
    from worker.learn.model import load_backbone

    backbone = load_backbone(settings)
    out: dict[str, dict[str, float | None]] = {}
    for s in sl.segments:
        probs = score_segment(backbone, None, None, pairs_of(sl.holdout[s]))
        auc, ll = _metric(holdout_score(labels_of(sl.holdout[s]), probs))
        out[s] = {"auc": auc, "logloss": ll}
    return out


def offline_checkpoints(
    sl: LiveSlice, settings: Settings, quick: bool, positions: Sequence[int]
) -> tuple[list[dict[str, Any]], str]:
    """The offline simulation (`evaluate.run_evaluation`, procedure `worker`) on the same slice, held-out
    pairs and settings, in the live shape, at the same stream positions."""
    plan = evaluate.EvalPlan(notes=("offline simulation on the live slice",))
    result = evaluate.run_evaluation(
        sl.as_dataset(),
        settings,
        quick=quick,
        progress=False,
        plan=plan,
        procedures=("worker",),
        stream_checkpoints=positions,
    )
    measured = [c["events"] for c in result["stream"]]
    if measured != list(positions):
        raise RuntimeError(f"the offline simulation measured {measured}, the live run {list(positions)}")
    out: list[dict[str, Any]] = []
    for checkpoint in result["stream"]:
        per = {
            s: {**m, "labelled": sl.labelled(s, checkpoint["events"])}
            for s, m in checkpoint["per_segment"].items()
        }
        out.append({**checkpoint, "per_segment": per})
    note = (
        "offline: the simulation measured at the same stream positions, the last one before its final "
        "shared run (as the live workers: none runs after the stream); its versions count every run, "
        "promoted or not, as the registry numbers them"
    )
    return out, note


# ------------------------------------------------------------------ output


def plot_live(result: Mapping[str, Any], path: Path) -> Path:
    """Mean held-out AUC over the stream: live, offline when present, and zero-shot (PNG, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (
        ("live", f"live ({result['workers']} worker(s))", "o-"),
        ("offline", "offline", "s--"),
    ):
        points = [(c["events"], c["mean_auc"]) for c in result.get(key) or [] if c["mean_auc"] is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=label)
    if result.get("zero_shot_mean_auc") is not None:
        ax.axhline(result["zero_shot_mean_auc"], color="grey", linestyle=":", label="zero-shot")
    ax.set_xlabel("events of the slice produced")
    ax.set_ylabel(f"mean held-out AUC ({len(result['segments'])} segments)")
    ax.set_title("live evaluation" + (" (quick)" if result.get("quick") else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli_main(args: argparse.Namespace, settings: Settings, dataset: Dataset) -> int:
    """`eval --live`: progress on stderr, the JSON as the last stdout line with `--json`."""

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    options = LiveOptions(
        workers=args.workers or 1,
        limit=args.limit,
        checkpoint_every=args.checkpoint_every,
        compare_offline=args.compare_offline,
    )
    try:
        result = run_live(dataset, settings, args.quick, options, say=say)
    except (LiveEvalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.plot is not None:
        plot_live(result, args.plot)
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        for c in result["live"]:
            offline = next((o for o in result.get("offline") or [] if o["events"] == c["events"]), None)
            extra = "" if offline is None else f"  offline {_fmt(offline['mean_auc'])}"
            print(
                f"{c['events']:>8} events  live AUC {_fmt(c['mean_auc'])}  "
                f"log loss {_fmt(c['mean_logloss'])}{extra}"
            )
    ok = all(code == 0 for code in result["exit_codes"])
    if not ok:
        print(f"error: a worker did not exit 0: {result['exit_codes']}", file=sys.stderr)
    return 0 if ok else 1
