"""`python -m worker demo`: the whole job on the local stack, sized for 2 CPU cores and about 10 minutes.

It starts `python -m worker run` as a separate process on topics and Redis keys of its own (so repeated
demos do not mix) and replays the first events of a data set into it (by default the generated shop, which
ships with the project: synthetic, see docs/generated-shop.md; `--data homedepot` for real data) in
`--phases` consecutive parts, waiting after each until the worker has been quiet for a while: the first
part bootstraps the shared model and each segment's first adapter, every later part continues each
segment's adapter from its champion, as a running worker does when a day's new events arrive. Then (or
when the time budget is spent) it stops the worker with SIGTERM and reads `scores` and `model-versions`
back from Kafka to print what happened per segment. It then scores the data set's held-out pairs (never
replayed) with what the worker left in its registry: zero-shot, the shared model alone, and what it serves
the segment (shared + adapter when one was promoted), and plots holdout AUC over events.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.logs import configure_logging
from worker.stream.kafka import client_config, ensure_topics
from worker.tools.datasets import SHOP, load_dataset
from worker.tools.procs import child_env, start_worker, stop_worker
from worker.tools.replay import dataset_events, produce_events
from worker.tools.run_settings import isolated

# Sized for a 2-core CPU: shorter sequences and earlier shared runs than the defaults, and the shared
# learning rate that measured best on a few thousand pooled events (docs/learning.md). Adapters at 1e-3:
# at the default 1e-4 a few hundred events move a cohort's AUC by about 1 point on the generated shop,
# at 1e-3 by several (docs/generated-shop.md); the gate keeps out adapters that do not help. The shared
# model bootstraps on the first part of the replay and is not retrained on the demo's few thousand events:
# a promotion at the end would retire every adapter until its segment's next events (docs/learning.md).
DEMO_SETTINGS: dict[str, object] = {
    "max_seq_len": 32,
    "shared_lr": 2e-4,
    "adapter_lr": 1e-3,
    "min_new_events": 32,
    "train_cooldown_s": 5.0,
    "shared_every": 6000,
    "shared_bootstrap_min_events": 2000,
    "shared_holdout_frac": 0.1,
    "metrics_port": 0,
}
STARTS = {"training", "shared training"}
ENDS = {"segment run", "shared run", "no shared model serves yet: segment waits", "training job failed"}


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default=SHOP,
        help="`shop` (generated, synthetic; the default), `homedepot`, a .csv.gz or a .jsonl of click events",
    )
    parser.add_argument("--events", type=int, default=8000, help="replay the first N events of the stream")
    parser.add_argument(
        "--phases",
        type=_at_least_one,
        default=2,
        help="replay them in this many consecutive parts, each once the worker is quiet after the last",
    )
    parser.add_argument("--budget-s", type=float, default=1800.0, help="stop the worker after this long")
    parser.add_argument(
        "--quiet-s",
        type=float,
        default=60.0,
        help="the worker is quiet once no decision came for this long (next part, or stop)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("demo-auc.png"),
        help="PNG of held-out AUC per segment and over events",
    )


def _read_all(settings: Settings, topic: str) -> list[dict[str, Any]]:
    """Everything on `topic` from the beginning up to its current end."""
    consumer = Consumer({**client_config(settings), "group.id": f"demo-read-{uuid.uuid4().hex[:8]}"})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    ends = {}
    for p in meta.partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        if high > low:
            ends[p] = high
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    out: list[dict[str, Any]] = []
    done: set[int] = set()
    deadline = time.monotonic() + 60
    while len(done) < len(ends) and time.monotonic() < deadline:
        for msg in consumer.consume(1000, 0.5):
            value, offset, partition = msg.value(), msg.offset(), msg.partition()
            if msg.error() is not None or value is None or offset is None or partition is None:
                continue
            out.append(orjson.loads(value))
            if offset + 1 >= ends[partition]:
                done.add(partition)
    consumer.close()
    return out


def _versions_seen(settings: Settings) -> int:
    consumer = Consumer({**client_config(settings), "group.id": f"demo-probe-{uuid.uuid4().hex[:8]}"})
    topic = settings.versions_topic
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    total = 0
    for p in meta.partitions if meta else []:
        total += consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
    consumer.close()
    return total


def _request_scores(settings: Settings, events: list[ClickEvent]) -> None:
    """Ask the running worker for scores of a few pairs of the two busiest segments; wait for the answers."""

    from confluent_kafka import Producer

    top = [s for s, _ in Counter(e.segment for e in events).most_common(2)]
    producer = Producer(client_config(settings))
    wanted = 0
    for segment in top:
        pairs = [
            {"query": e.query, "item_id": e.item_id, "item_text": e.item_text}
            for e in events
            if e.segment == segment
        ][:5]
        request = {"request_id": f"demo-{segment}", "segment": segment, "pairs": pairs}
        producer.produce(settings.requests_topic, key=segment.encode(), value=orjson.dumps(request))
        wanted += len(pairs)
    producer.flush(10)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        answers = [s for s in _read_all(settings, settings.scores_topic) if s.get("request_id")]
        if len(answers) >= wanted:
            print(f"score requests for {top} answered: {len(answers)} scores")
            return
        time.sleep(2)
    print("score requests: no complete answer within 120 s")


def _logged(log_path: Path) -> list[str]:
    """The `event` of every JSON line of the worker's log so far."""
    if not log_path.exists():
        return []
    out = []
    for raw in log_path.read_bytes().splitlines():
        try:
            event = orjson.loads(raw).get("event")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if isinstance(event, str):
            out.append(event)
    return out


def _busy(log_path: Path) -> bool:
    """A training has started and not ended, judging by the worker's JSON log."""
    events = _logged(log_path)
    return sum(e in STARTS for e in events) > sum(e in ENDS for e in events)


def _plot(versions: list[dict[str, Any]], table: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: held-out AUC per segment of zero-shot, the shared model alone and what is served. Right: the
    gate's holdout AUC of each promoted version over the segment's events (one point per promotion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 5))
    segments = list(table)
    x = np.arange(len(segments))
    for i, (key, label) in enumerate(
        (("zero_shot", "zero-shot"), ("shared", "shared alone"), ("served", "served"))
    ):
        values = [np.nan if table[s][key] is None else table[s][key] for s in segments]
        bars.bar(x + (i - 1) * 0.27, values, width=0.27, label=label)
    bars.set_xticks(x, [s[:16] for s in segments], rotation=30, ha="right", fontsize=8)
    bars.set_ylim(0.4, 1.0)
    bars.set_ylabel("AUC on held-out pairs (never replayed)")
    bars.set_title("held-out AUC per segment")
    bars.legend(fontsize=8, loc="upper left")

    by_segment: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for v in versions:
        if (
            v["scope"] == "segment"
            and v["decision"] == "promoted"
            and v["challenger"]
            and v["challenger"]["auc"]
        ):
            by_segment[v["segment"]].append((v["events_to"], v["challenger"]["auc"]))
    for segment, points in sorted(by_segment.items(), key=lambda kv: -len(kv[1]))[:12]:
        xs, ys = zip(*sorted(points), strict=True)
        curve.plot(xs, ys, marker="o", label=segment)
    curve.set_xlabel("segment events seen (buffer sequence number)")
    curve.set_ylabel("gate holdout AUC of the promoted version")
    curve.set_title("promoted versions per segment")
    if by_segment:
        curve.legend(fontsize=7, loc="lower right")
    fig.suptitle("ctr-worker demo")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def phase_bounds(events: int, phases: int) -> list[tuple[int, int]]:
    """[start, end) of each part of the replay: `phases` consecutive, near-equal, none empty."""
    if phases < 1:
        raise ValueError(f"--phases must be at least 1, got {phases}")
    cuts = [round(events * i / phases) for i in range(phases + 1)]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _wait_quiet(
    settings: Settings,
    worker: subprocess.Popen[bytes],
    log_path: Path,
    started: float,
    args: argparse.Namespace,
) -> bool:
    """Until no model-version event came and no training ran for `--quiet-s`; False when the budget ran
    out or the worker exited first. Called once the worker consumes, so a quiet worker is one that has
    read what was replayed and has nothing left to train."""
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() - started < args.budget_s and worker.poll() is None:
        count = _versions_seen(settings)
        if count != last_count or _busy(log_path):
            if count != last_count:
                print(f"  {time.monotonic() - started:6.0f} s: {count} model-version events", flush=True)
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > args.quiet_s:
            print(f"  worker quiet for {args.quiet_s:.0f} s")
            return True
        time.sleep(5)
    return False


def _wait_consuming(worker: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> bool:
    """Until the worker logs its first partition assignment; False if it exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and worker.poll() is None:
        if "assigned" in _logged(log_path):
            return True
        time.sleep(1)
    return False


def cli_main(args: argparse.Namespace) -> int:
    run_id = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    settings = isolated(load_settings(), run_id, **DEMO_SETTINGS)
    configure_logging(settings.log_level)
    print(f"demo run {run_id}: {args.events} events of {args.data}, worker settings {DEMO_SETTINGS}")
    print(f"data: {describe_data(args.data)}")
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    events, restamp = dataset_events(args.data, args.events)
    parts = phase_bounds(len(events), args.phases)

    log_path = settings.model_store.parent / "worker.log"
    started = time.monotonic()
    worker = start_worker(child_env(settings), log_path, stdout_to_log=True)
    try:
        if not _wait_consuming(worker, log_path, min(300.0, args.budget_s)):
            print(f"the worker did not start consuming; see {log_path}")
        produced = 0
        for i, (a, b) in enumerate(parts, 1):
            if worker.poll() is not None:
                break
            print(f"part {i}/{len(parts)}: events {a + 1:,}-{b:,}")
            produced += produce_events(settings, events[a:b], restamp=restamp, total=b - a, progress=True)
            print(f"replayed {produced} events into {settings.input_topic}; worker log: {log_path}")
            if not _wait_quiet(settings, worker, log_path, started, args):
                print(f"  budget of {args.budget_s:.0f} s spent or the worker exited: stopping")
                break
        if worker.poll() is None:
            _request_scores(settings, events)
    finally:
        code = stop_worker(worker, 120)
    print(f"worker stopped with exit code {code} after {time.monotonic() - started:.0f} s")

    versions = _read_all(settings, settings.versions_topic)
    scores = _read_all(settings, settings.scores_topic)
    _report(versions, scores)
    segments = {v["segment"] for v in versions if v["scope"] == "segment"} | {s["segment"] for s in scores}
    print(f"\nheld-out AUC per segment ({describe_data(args.data)}; pairs never replayed):")
    table = heldout_auc(settings, args.data, segments)
    print_heldout(table, versions, scores)
    _plot(versions, table, args.plot)
    print(f"plot: {args.plot.resolve()}")
    return 0 if code == 0 else 1


def _report(versions: list[dict[str, Any]], scores: list[dict[str, Any]]) -> None:
    shared = [v for v in versions if v["scope"] == "shared"]
    for v in shared:
        auc = v["challenger"]["auc"] if v["challenger"] else None
        champ = v["champion"]["auc"] if v["champion"] else None
        print(f"shared model v{v['version']}: {v['decision']} (AUC {auc}, champion {champ}) {v['reason']}")
    per: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"promoted": 0, "rejected": 0, "failed": 0, "auc": None}
    )
    for v in versions:
        if v["scope"] != "segment":
            continue
        row = per[v["segment"]]
        row[v["decision"]] += 1
        if v["decision"] == "promoted" and v["challenger"]:
            row["auc"] = v["challenger"]["auc"]
    published: dict[str, int] = defaultdict(int)
    for s in scores:
        published[s["segment"]] += 1
    print(f"\n{'segment':<32} {'promoted':>8} {'rejected':>8} {'failed':>6} {'last AUC':>8} {'scores':>7}")
    for segment, row in sorted(per.items(), key=lambda kv: -kv[1]["promoted"]):
        auc = f"{row['auc']:.3f}" if row["auc"] is not None else "-"
        print(
            f"{segment[:32]:<32} {row['promoted']:>8} {row['rejected']:>8} {row['failed']:>6} {auc:>8}"
            f" {published.get(segment, 0):>7}"
        )
    print(f"\n{len(versions)} model-version events, {len(scores)} scores read back from Kafka")
    for s in scores[:3]:
        print("  score sample:", orjson.dumps(s).decode())
    for v in versions[:2]:
        print("  version sample:", orjson.dumps(v).decode()[:300])


def describe_data(spec: str) -> str:
    if spec == SHOP:
        return "the generated shop: synthetic click events, not real data (docs/generated-shop.md)"
    return f"{spec}: real data"


def heldout_auc(settings: Settings, data: str, segments: set[str]) -> dict[str, dict[str, Any]]:
    """Per segment with held-out pairs, AUC of zero-shot, the shared model the worker serves, and what it
    serves the segment (its `Learner`, reading the run's registry): held-out pairs were never replayed."""
    from worker.learn.learner import Learner
    from worker.learn.train import score_segment
    from worker.learn.training_data import folds_of, labels_of, pairs_of
    from worker.ops.quality import auc_difference, holdout_score
    from worker.state.registry import Registry

    dataset = load_dataset(data)
    learner = Learner(settings, Registry.from_settings(settings))
    learner.refresh_shared()
    out: dict[str, dict[str, Any]] = {}
    for segment in sorted(segments & set(dataset.holdout)):
        held = dataset.holdout[segment]
        labels, pairs, folds = labels_of(held), pairs_of(held), folds_of(held)
        zero = holdout_score(labels, score_segment(learner.backbone, None, None, pairs)).auc
        shared = gain = None
        served_scores, version = learner.score_events(segment, held)
        served = holdout_score(labels, served_scores)
        if learner.shared is not None:
            shared_scores = score_segment(learner.backbone, learner.shared, None, pairs, folds)
            shared = holdout_score(labels, shared_scores)
            gain = auc_difference(labels, served_scores, shared_scores)
        out[segment] = {
            "n": len(held),
            "zero_shot": zero,
            "shared": None if shared is None else shared.auc,
            "served": served.auc,
            "gain": None if gain is None else gain.delta,
            "gain_se": None if gain is None else gain.se,
            "shared_logloss": None if shared is None else shared.logloss,
            "served_logloss": served.logloss,
            "version": version,
        }
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_heldout(
    table: dict[str, dict[str, Any]], versions: list[dict[str, Any]], scores: list[dict[str, Any]]
) -> None:
    """One row per segment: versions promoted and rejected, held-out AUC of zero-shot, shared alone and
    served (`vN`: shared + the segment's adapter version N; `shared`: no adapter), served minus shared with
    its DeLong standard error, the log loss of the last two (the gate also promotes on a calibration gain:
    click probabilities are what is served), and the scores read back."""
    decided: dict[str, Counter[str]] = defaultdict(Counter)
    for v in versions:
        if v["scope"] == "segment":
            decided[v["segment"]][v["decision"]] += 1
    published = Counter(s["segment"] for s in scores)
    print(
        f"{'segment':<24} {'promoted':>8} {'rejected':>8} {'n':>5} {'zero-shot':>9} {'shared':>7}"
        f" {'served':>7} {'by':>6} {'gain ± se':>15} {'ll shared':>9} {'ll served':>9} {'scores':>7}"
    )
    for segment, row in table.items():
        gain = "-" if row["gain"] is None else f"{row['gain']:+.3f} ± {row['gain_se']:.3f}"
        by = f"v{row['version']}" if row["version"] else "shared"
        print(
            f"{segment[:24]:<24} {decided[segment]['promoted']:>8} {decided[segment]['rejected']:>8}"
            f" {row['n']:>5} {_fmt(row['zero_shot']):>9} {_fmt(row['shared']):>7} {_fmt(row['served']):>7}"
            f" {by:>6} {gain:>15} {_fmt(row['shared_logloss']):>9}"
            f" {_fmt(row['served_logloss']):>9} {published.get(segment, 0):>7}"
        )
