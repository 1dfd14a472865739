"""`python -m worker bench capacity --segments 1000`: what many segments cost one worker's memory.

The question for capacity planning is whether a worker can serve N segments with a bounded footprint: the
shared model is loaded once, and segment adapters are kept in an LRU of `WORKER_MAX_RESIDENT_ADAPTERS`
and loaded lazily from the model store. This bench builds that situation with the real pieces (Registry
in Redis under a fresh key prefix, model store in a temp dir, `Learner` on CPU), scores one pair for every
segment through `Learner.score`, and reports resident memory (VmRSS) at each step, the number of resident
adapters, and the cold-load time of one adapter against a plain `safetensors.torch.load_file` of its
weights file (same files, same page cache) in the same run.

One real adapter is trained (`train_segment_adapter`, a few synthetic events, untrained shared model);
the N segments' champions are copies of it, saved and recorded one by one as the worker does. Memory and
load times do not depend on the weights' values, only on their shapes, which a copy shares.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import redis

from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.state import keys
from worker.state.registry import SHARED_SEGMENT, Registry, VersionRecord
from worker.tools.bench.synthetic import synthetic_events
from worker.tools.procs import rss_kib
from worker.tools.run_settings import isolated

TRAIN_EVENTS = 64


def _say(msg: str) -> None:
    print(f"[bench capacity] {msg}", file=sys.stderr, flush=True)


def rss_mib() -> float:
    """Resident set size of this process, MiB."""
    kib = rss_kib()
    return float("nan") if kib is None else kib / 1024


def _pcts(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p95_ms": round(float(np.percentile(arr, 95)), 3),
    }


def _record(
    registry: Registry,
    segment: str,
    version: int,
    adapter: Path,
    scope: Literal["segment", "shared"] = "segment",
    shared_version: int | None = None,
) -> None:
    registry.record(
        VersionRecord(
            scope=scope,
            segment=segment,
            version=version,
            parent_version=None,
            decision="promoted",
            reason="bench capacity",
            base_model="bench",
            events_from=0,
            events_to=0,
            challenger=None,
            champion=None,
            device="cpu",
            train_seconds=0.0,
            created_at=datetime.now(UTC),
            adapter=str(adapter),
            shared_version=shared_version,
        ),
        gated_against=registry.champion_version(segment),
    )


def _prepare_models(settings: Settings, shared_dir: Path, adapter_dir: Path) -> float:
    """In a child process, so training's memory never shows in the figures: an (untrained) shared
    model and one adapter really trained on it; returns the training seconds."""
    from worker.learn.backbone import load_backbone
    from worker.learn.click_model import new_click_model
    from worker.learn.store import save_adapter, save_shared
    from worker.learn.train import train_segment_adapter

    backbone = load_backbone(settings)
    shared = new_click_model(backbone, settings.seed)
    save_shared(shared_dir, shared, {"segment": SHARED_SEGMENT, "version": 1})
    events = [ClickEvent.model_validate_json(v) for _, v in synthetic_events(TRAIN_EVENTS, 1, seed=1)]
    t = time.perf_counter()
    result = train_segment_adapter(backbone, shared, None, events[:48], [], events[48:], settings)
    train_s = time.perf_counter() - t
    if result.adapter is None:
        raise RuntimeError(f"the one real adapter failed to train: {result.reason}")
    save_adapter(adapter_dir, result.adapter, {"segment": "template", "version": 1})
    return train_s


def run_bench(settings: Settings, segments: int, cap: int, cold_loads: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    from worker.learn.learner import Learner
    from worker.learn.store import load_adapter, save_adapter

    store = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    run_id = f"benchcap{uuid.uuid4().hex[:8]}"
    s = isolated(settings, run_id, model_store=store, max_resident_adapters=cap, device="cpu")
    client: redis.Redis[bytes] = redis.Redis.from_url(s.redis_url)
    registry = Registry.from_settings(s, client)
    shared_reg = registry.shared()
    try:
        rss = {"start_mib": rss_mib()}
        version = shared_reg.next_version(SHARED_SEGMENT)
        shared_dir = shared_reg.adapter_dir(SHARED_SEGMENT, version)
        template = store / "template-adapter"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            train_s = pool.submit(
                _prepare_models, s.model_copy(update={"adapter_epochs": 1}), shared_dir, template
            ).result()
        _record(shared_reg, SHARED_SEGMENT, version, shared_dir, scope="shared")
        adapter, _ = load_adapter(template)
        names = [f"capacity-{i:05d}" for i in range(segments)]
        t = time.perf_counter()
        for name in names:
            v = registry.next_version(name)
            target = save_adapter(registry.adapter_dir(name, v), adapter, {"segment": name, "version": v})
            _record(registry, name, v, target, shared_version=version)
        save_s = time.perf_counter() - t
        del adapter
        adapter_bytes = sum(f.stat().st_size for f in registry.adapter_dir(names[0], 1).iterdir())
        _say(
            f"1 adapter trained in {train_s:.1f} s (child process), {segments} copies saved and "
            f"recorded in {save_s:.1f} s"
        )

        learner = Learner(s, registry)
        rss["backbone_mib"] = rss_mib()
        learner.refresh_shared()
        assert learner.shared is not None
        rss["shared_model_mib"] = rss_mib()
        _say(f"backbone and shared model v{version} loaded; RSS {rss['shared_model_mib']:.0f} MiB")

        score_s = []
        pair = [("cordless drill", "cordless brushless drill kit")]
        for name in names:
            t = time.perf_counter()
            _, v = learner.score(name, pair)
            score_s.append(time.perf_counter() - t)
            if v != 1:
                raise RuntimeError(f"{name} was scored by version {v}, not its champion 1")
            if len(score_s) % 100 == 0:
                _say(f"scored {len(score_s)} of {segments}")
        rss["after_scoring_mib"] = rss_mib()
        resident = learner.resident_adapters()
        _say(
            f"scored {segments} segments; {resident} adapters resident (cap {cap}); "
            f"RSS {rss['after_scoring_mib']:.0f} MiB"
        )

        cold, raw = [], []
        for i in range(cold_loads):
            name = names[i % segments]
            learner.evict(name)  # make it cold, whatever the cap
            t = time.perf_counter()
            learner.adapter(name)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            load_file(str(registry.adapter_dir(name, 1) / "adapter_model.safetensors"))
            raw.append(time.perf_counter() - t)
        cold_p, raw_p = _pcts(cold), _pcts(raw)
        return {
            "bench": "capacity",
            "segments": segments,
            "max_resident_adapters": cap,
            "resident_adapters": resident,
            "rss_mib": {k.removesuffix("_mib"): round(v, 1) for k, v in rss.items()},
            "rss_growth_scoring_mib": round(rss["after_scoring_mib"] - rss["shared_model_mib"], 1),
            "adapter_file_bytes": adapter_bytes,
            "score_one_pair": _pcts(score_s),
            "cold_load": {**cold_p, "n": cold_loads},
            "raw_load_file": raw_p,
            "cold_load_ratio_p50": round(cold_p["p50_ms"] / raw_p["p50_ms"], 2),
            "train_one_adapter_s": round(train_s, 2),
            "save_and_record_s": round(save_s, 2),
            "device": learner.device,
            "adapters": f"1 trained on {TRAIN_EVENTS} synthetic events, {segments} saved copies",
            "note": (
                "rss start = after imports (torch loaded); cold load = Learner.adapter on a segment not in "
                "the LRU: registry lookups + load_adapter (page cache warm); raw = load_file of "
                "adapter_model.safetensors only"
            ),
        }
    finally:
        for key in client.scan_iter(match=keys.prefix_pattern(s.redis_prefix), count=1000):
            client.unlink(key)
        client.close()
        shutil.rmtree(store, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument(
        "--cap", type=int, default=None, help="resident adapters (default: WORKER_MAX_RESIDENT_ADAPTERS)"
    )
    parser.add_argument("--cold-loads", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print only the JSON result line on stdout")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    cap = args.cap if args.cap is not None else settings.max_resident_adapters
    result = run_bench(settings, args.segments, cap, args.cold_loads)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>24}: {value}", file=sys.stderr)
    print(orjson.dumps(result).decode())
    return 0
