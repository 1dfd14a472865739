"""The learner against the real Redis registry: what it records, and what it refuses to record."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from registry_helpers import shared_record, version_record

from worker.config import Settings
from worker.events import ClickEvent, HoldoutMetrics, ServingChoice, ServingPrior
from worker.learn.choice import Choice, blend
from worker.learn.click_model import new_click_model
from worker.learn.history import fold_of
from worker.learn.learner import Abandoned, Candidate, Learner, Serving, clean_partial_dirs
from worker.learn.store import STALE_TMP_S, _atomic_dir, abandoned, save_shared
from worker.learn.train import TrainResult, score_segment
from worker.ops.quality import HoldoutScore
from worker.state import pins
from worker.state.registry import SHARED_SEGMENT, Registry, VersionRecord
from worker.tools.datasets import load_homedepot

pytestmark = pytest.mark.integration


@pytest.fixture
def learner(settings: Settings) -> Learner:
    small = settings.model_copy(
        update={
            "max_seq_len": 16,
            "adapter_epochs": 1,
            "gate_auc_tolerance": 1.0,
            "gate_logloss_margin": 1000.0,
            "gate_min_holdout": 1,
            "shared_min_holdout": 1,
        }
    )
    registry = Registry.from_settings(small)
    learner = Learner(small, registry)
    shared = registry.shared()
    version = shared.next_version(SHARED_SEGMENT)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, version), new_click_model(learner.backbone, 0))
    shared.record(shared_record(version, path, events_to=0))
    return learner


def _trained(
    learner: Learner, new: list[ClickEvent], older: list[ClickEvent], seq: tuple[int, int]
) -> VersionRecord | None:
    """A segment training of GE as the worker runs it: trained and gated, then stored and recorded."""
    candidate = learner.train_segment("GE", new, older, seq)
    return None if candidate is None else learner.record(candidate)


def test_a_training_of_a_lost_partition_records_nothing(learner: Learner) -> None:
    """Training and gating record nothing; recording refuses a partition lost meanwhile, and a version is
    reserved only by a recording that goes ahead."""
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:40]
    candidate = learner.train_segment("GE", events[20:], events[:20], (21, 40))
    assert candidate is not None and candidate.result.decision == "promoted"
    assert learner.registry.versions("GE") == [] and learner.registry.reserved("GE") == 0
    with pytest.raises(Abandoned):
        learner.record(candidate, still_owned=lambda: False)
    assert learner.registry.versions("GE") == [] and learner.registry.reserved("GE") == 0
    rec = learner.record(candidate, still_owned=lambda: True)
    assert rec.version == 1 and rec.decision == "promoted" and learner.registry.champion_version("GE") == 1
    pairs = [(e.query, e.item_text) for e in events[:5]]
    probs, version = learner.score("GE", pairs)
    assert version == 1 and all(0.0 <= float(p) <= 1.0 for p in probs)
    again, _ = learner.score("GE", pairs)
    assert list(learner._composed) == [("GE", 1, learner.shared_version)]
    from worker.learn.train import score_segment

    uncached = score_segment(learner.backbone, learner.shared, learner.adapter("GE")[1], pairs)
    assert np.allclose(again, probs) and np.allclose(uncached, probs, atol=1e-6)


def test_a_shared_run_that_lost_its_lock_records_nothing(learner: Learner) -> None:
    events = [e for e in load_homedepot().stream() if e.segment != "GE"][:60]
    before = learner.shared_registry.versions(SHARED_SEGMENT)
    candidate = learner.train_shared(events[30:], events[:30], (0, 30))
    assert learner.shared_registry.versions(SHARED_SEGMENT) == before, "training records nothing"
    with pytest.raises(Abandoned):
        learner.record(candidate, still_owned=lambda: False)
    assert learner.shared_registry.versions(SHARED_SEGMENT) == before
    rec = learner.record(candidate, still_owned=lambda: True)
    assert [r.version for r in learner.shared_registry.versions(SHARED_SEGMENT)] == [
        *(r.version for r in before),
        rec.version,
    ]


def test_a_shared_promotion_records_what_it_serves_and_holds_back_with_their_evidence(
    learner: Learner,
) -> None:
    """The shared version's event says, per segment of its pooled holdout, whether it serves it, and on
    which pairs: `serves` and `held_back`, each with the holdout size and both AUCs."""
    learner.refresh_shared()
    scores = HoldoutScore(auc=0.75, logloss=0.6, n=300)
    judged = {
        "GE": Choice("zero_shot", 50, {"zero_shot": 0.7, "shared": 0.6}, "zero_shot keeps serving"),
        "Delta": Choice("shared", 80, {"zero_shot": 0.6, "shared": 0.7}, "shared replaces zero_shot"),
    }
    result = TrainResult(
        decision="promoted",
        reason="test",
        challenger=scores,
        champion=scores,
        train_seconds=0.0,
        device="cpu",
        shared=new_click_model(learner.backbone, 2),
        judged=judged,
    )
    parent = learner.shared_version
    rec = learner.record(
        Candidate(learner.shared_registry, SHARED_SEGMENT, "shared", result, parent, (0, 1), parent)
    )
    stored = learner.shared_registry.versions(SHARED_SEGMENT)[-1]
    for r in (rec, stored):
        assert set(r.serves) == {"Delta"} and set(r.held_back) == {"GE"}
        assert (r.serves["Delta"].n, r.serves["Delta"].auc) == (80, {"zero_shot": 0.6, "shared": 0.7})
        assert r.serves["Delta"].shared_version == r.version == r.held_back["GE"].shared_version


def test_partial_dirs_left_by_a_crash_are_removed(settings: Settings) -> None:
    store = settings.model_store
    (store / "abc" / ".00000003.tmp-deadbeef").mkdir(parents=True)
    (store / "abc" / "00000002").mkdir(parents=True)
    stale = time.time() - STALE_TMP_S - 60
    os.utime(store / "abc" / ".00000003.tmp-deadbeef", (stale, stale))
    assert clean_partial_dirs(store) == 1
    assert [p.name for p in (store / "abc").iterdir()] == ["00000002"]


def test_start_up_cleanup_leaves_the_temp_dirs_other_live_workers_are_writing(settings: Settings) -> None:
    """Two workers share the store: the one starting removes its own and dead processes' temp dirs and
    stale ones, never a fresh one another live process (here or on another host) is still writing."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    seg = settings.model_store / "abc"
    names = {
        "live_here": f".00000004.tmp-{host}-{other.pid}-{'a' * 32}",
        "other_host": f".00000005.tmp-worker-7f9c-1-{'b' * 32}",
        "dead_here": f".00000006.tmp-{host}-{dead.pid}-{'c' * 32}",
        "mine": f".00000007.tmp-{host}-{os.getpid()}-{'d' * 32}",
        "stale": f".00000008.tmp-worker-7f9c-1-{'e' * 32}",
    }
    try:
        for name in names.values():
            (seg / name / "encoder").mkdir(parents=True)
        stale = time.time() - STALE_TMP_S - 60
        os.utime(seg / names["stale"], (stale, stale))
        assert clean_partial_dirs(settings.model_store) == 3
        assert sorted(p.name for p in seg.iterdir()) == sorted([names["live_here"], names["other_host"]])
    finally:
        other.kill()
        other.wait()


def test_a_temp_dir_is_named_after_its_writer(tmp_path: Path) -> None:
    """The name `abandoned` reads: this process's own temp dir is what a restart of it would remove."""
    with _atomic_dir(tmp_path / "00000001") as tmp:
        assert f"-{os.getpid()}-" in tmp.name and abandoned(tmp)
    assert [p.name for p in tmp_path.iterdir()] == ["00000001"]


def test_score_events_scores_with_the_events_history_folds(
    learner: Learner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What prequential scoring calls: an event's own fold is left out of its query history features."""
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:6]
    probs, version = learner.score_events("GE", events)
    expected, _ = learner.score(
        "GE", [(e.query, e.item_text) for e in events], [fold_of(e.event_id) for e in events]
    )
    assert version == 0 and np.allclose(probs, expected)
    calls: list[tuple[str, list[tuple[str | None, str]], list[int | None] | None]] = []

    def spy(
        segment: str, pairs: Sequence[tuple[str | None, str]], folds: Sequence[int | None] | None = None
    ) -> tuple[np.ndarray, int]:
        calls.append((segment, list(pairs), None if folds is None else list(folds)))
        return np.zeros(len(pairs)), 0

    monkeypatch.setattr(learner, "score", spy)
    learner.score_events("GE", events)
    assert calls == [("GE", [(e.query, e.item_text) for e in events], [fold_of(e.event_id) for e in events])]


def test_evicted_adapters_load_again_from_the_store(learner: Learner) -> None:
    """The seam the capacity benchmark uses to make a segment cold."""
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:40]
    out = _trained(learner, events[20:], events[:20], (21, 40))
    assert out is not None and out.decision == "promoted"
    assert learner.resident_adapters() == 1
    learner.evict("GE")
    learner.evict("not-resident")
    assert learner.resident_adapters() == 0
    version, adapter = learner.adapter("GE")
    assert version == 1 and adapter is not None and learner.resident_adapters() == 1


def test_an_adapter_serves_only_on_the_shared_version_it_was_gated_on(learner: Learner) -> None:
    """Lineage and re-basing: the adapter's record names its shared version; once another shared model
    is champion, the segment is served by the shared model alone (version 0) until it is retrained on
    the new one, and a rollback of the shared model brings the adapter back."""
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:60]
    out = _trained(learner, events[20:40], events[:20], (21, 40))
    assert out is not None and out.decision == "promoted"
    first_shared = learner.shared_version
    assert out.shared_version == first_shared and out.event().shared_version == first_shared
    pairs = [(e.query, e.item_text) for e in events[:4]]
    assert learner.score("GE", pairs)[1] == out.version

    shared = learner.shared_registry
    version = shared.next_version(SHARED_SEGMENT)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, version), new_click_model(learner.backbone, 1))
    stored = shared.record(shared_record(version, path), gated_against=first_shared)
    assert stored.decision == "promoted"
    probs, served = learner.score("GE", pairs)
    assert learner.shared_version == version and served == 0, "stale adapter is not served"
    assert learner.registry.champion_version("GE") == out.version, "its record stays"

    again = _trained(learner, events[40:], events[:40], (41, 60))
    assert again is not None and again.decision == "promoted"
    assert again.shared_version == version and again.parent_version is None
    assert learner.score("GE", pairs)[1] == again.version

    shared.rollback(SHARED_SEGMENT, first_shared)
    learner.registry.rollback("GE", out.version)
    assert learner.score("GE", pairs)[1] == out.version and learner.shared_version == first_shared
    assert not np.allclose(probs, learner.score("GE", pairs)[0])


def test_plain_transformers_and_peft_rebuild_the_served_encoder_from_the_files(learner: Learner) -> None:
    """The adapter's `adapter_config.json` names the shared model's encoder directory it was trained on,
    so loading it as its config says gives exactly the encoder the worker serves (it used to name the
    packaged base model: a different encoder, cosine 0.86 on one pair)."""
    import json
    from pathlib import Path

    import torch
    from peft import PeftModel
    from transformers import AutoModel

    from worker.learn.encoder import mean_pool

    moved = new_click_model(learner.backbone, 2)
    with torch.no_grad():
        for param in moved.encoder.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    shared = learner.shared_registry
    version = shared.next_version(SHARED_SEGMENT)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, version), moved)
    champion = shared.champion_version(SHARED_SEGMENT)
    shared.record(shared_record(version, path), gated_against=champion)
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:40]
    out = _trained(learner, events[20:], events[:20], (21, 40))
    assert out is not None and out.adapter is not None and out.shared_version == version
    adapter_dir = Path(out.adapter)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    shared_dir = learner.shared_registry.champion(SHARED_SEGMENT)
    assert shared_dir is not None and base == str(Path(str(shared_dir.adapter)) / "encoder")

    rebuilt = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(adapter_dir)).eval()
    version, adapter = learner.adapter("GE")
    served = learner._serving("GE", version, adapter)
    pairs = [(e.query, e.item_text) for e in events[:6]]
    batch = learner.backbone.collate(learner.backbone.encode(pairs))
    with torch.no_grad():
        ours = served.embed(batch)
        hidden = rebuilt(
            input_ids=batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=batch["attention_mask"],
        ).last_hidden_state
        theirs = mean_pool(hidden, batch["attention_mask"])
    assert torch.allclose(ours, theirs, atol=1e-5)
    plain = AutoModel.from_pretrained(str(learner.base_model)).eval()
    with torch.no_grad():
        packaged = mean_pool(
            plain(
                input_ids=batch["input_ids"],
                token_type_ids=batch["token_type_ids"],
                attention_mask=batch["attention_mask"],
            ).last_hidden_state,
            batch["attention_mask"],
        )
    assert not torch.allclose(ours, packaged, atol=1e-3), "the check can tell the two encoders apart"


def test_a_segment_held_back_by_a_shared_promotion_is_served_zero_shot_until_its_own_choice(
    learner: Learner, settings: Settings
) -> None:
    """A promoted shared version names the segments its pooled pairs do not clear it for against zero-shot:
    they score zero-shot (adapter version 0, shared version 0), the others the new shared model; a choice
    the segment makes on that shared version afterwards decides, and a restarted learner reads the same."""
    learner.refresh_shared()
    first = learner.shared_version
    shared = learner.shared_registry
    version = shared.next_version(SHARED_SEGMENT)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, version), new_click_model(learner.backbone, 1))
    back = ServingChoice(
        kind="zero_shot", shared_version=version, n=50, auc={"zero_shot": 0.7, "shared": 0.6}
    )
    shared.record(
        shared_record(
            version,
            path,
            held_back={"GE": back},
            challenger=HoldoutMetrics(auc=0.75, logloss=0.6, n=300),
            zero_shot=HoldoutMetrics(auc=0.70, logloss=0.7, n=300),
        ),
        gated_against=first,
    )
    pairs = [("cordless drill", "cordless brushless drill kit"), ("light bulb", "LED bulb 60W")]
    zero = score_segment(learner.backbone, None, None, pairs)
    for worker in (learner, Learner(learner.settings, Registry.from_settings(learner.settings))):
        assert worker.serving("GE") == Serving("zero_shot", 0, 0)
        assert np.allclose(worker.score("GE", pairs)[0], zero)
        assert worker.serving("Delta") == Serving("shared", 0, version)
        prior = worker.prior()
        assert prior is not None and prior.gain == pytest.approx(0.05), "recorded before priors were kept"
        assert prior.sd == learner.settings.serving_prior_sd
    recorded = ServingPrior(gain=0.03, sd=0.04, segments=5)
    again = shared.next_version(SHARED_SEGMENT)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, again), new_click_model(learner.backbone, 1))
    shared.record(
        shared_record(again, path, prior=recorded),
        gated_against=version,
    )
    assert learner.prior() == recorded, "the promotion's own prior, spread included"
    version = again
    later = learner.registry.next_version("GE")
    own = back.model_copy(update={"kind": "shared"})
    learner.registry.record(version_record("GE", later, None, decision="rejected", serving=own))
    assert learner.serving("GE") == Serving("shared", 0, version), "its own later choice decides"


def test_a_segment_a_shared_promotion_puts_on_the_blend_scores_the_blend_until_its_own_choice(
    learner: Learner,
) -> None:
    """A promotion that judged the blend best for a segment (`serves` names it with kind `blend`): the
    segment scores the blend of zero-shot and the new shared model, against an older choice of its own, in
    this learner and a restarted one, until it makes a choice on that shared version."""
    learner.refresh_shared()
    first = learner.shared_version
    shared = learner.shared_registry
    version = shared.next_version(SHARED_SEGMENT)
    model = new_click_model(learner.backbone, 1)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, version), model)
    on_blend = ServingChoice(
        kind="blend", shared_version=version, n=80, auc={"zero_shot": 0.6, "blend": 0.66, "shared": 0.63}
    )
    older = ServingChoice(kind="zero_shot", shared_version=first, n=40, auc={"zero_shot": 0.7})
    learner.registry.record(
        version_record("GE", learner.registry.next_version("GE"), None, decision="rejected", serving=older)
    )
    shared.record(
        shared_record(version, path, serves={"GE": on_blend}),
        gated_against=first,
    )
    pairs = [("cordless drill", "cordless brushless drill kit"), ("light bulb", "LED bulb 60W")]
    weight = learner.settings.serving_blend_weight
    expected = blend(
        score_segment(learner.backbone, None, None, pairs),
        score_segment(learner.backbone, model.eval(), None, pairs),
        weight,
    )
    for worker in (learner, Learner(learner.settings, Registry.from_settings(learner.settings))):
        assert worker.serving("GE") == Serving("blend", 0, version)
        probs, adapter_version = worker.score("GE", pairs)
        assert adapter_version == 0 and np.allclose(probs, expected, atol=1e-5)
        assert not np.allclose(probs, score_segment(learner.backbone, None, None, pairs), atol=1e-3)
        assert worker.serving("Delta") == Serving("shared", 0, version)
    own = on_blend.model_copy(update={"kind": "shared"})
    learner.registry.record(
        version_record("GE", learner.registry.next_version("GE"), None, decision="rejected", serving=own)
    )
    assert learner.serving("GE") == Serving("shared", 0, version), "its own later choice decides"
    pins.pin(learner.registry, "GE", "blend", "merchant asked", learner.base_model)
    assert learner.serving("GE") == Serving("blend", 0, version, pinned=True), "an operator's pin decides"
    probs, adapter_version = learner.score("GE", pairs)
    assert adapter_version == 0 and np.allclose(probs, expected, atol=1e-5)


def test_int8_scoring_serves_and_gates_the_quantised_model(
    learner: Learner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is gated is what is served: with `scoring_precision=int8` the gate scores the challenger and
    the champion int8, and the served copy (adapter merged, then quantised once) is the int8 model."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from worker.learn import train

    int8 = Learner(learner.settings.model_copy(update={"scoring_precision": "int8"}), learner.registry)
    calls: list[bool] = []
    real = train.served_copy

    def spy(model: Any, adapter: Any, int8: bool) -> Any:
        calls.append(int8)
        return real(model, adapter, int8)

    monkeypatch.setattr(train, "served_copy", spy)
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:40]
    out = _trained(int8, events[20:], events[:20], (21, 40))
    assert out is not None and out.decision == "promoted"
    assert len(calls) >= 2 and all(calls), "the gate's sides were scored int8"
    pairs = [(e.query, e.item_text) for e in events[:6]]
    probs, version = int8.score("GE", pairs)
    assert version == out.version
    [served] = int8._composed.values()
    assert any(isinstance(m, DynamicLinear) for m in served.encoder.modules())
    fp32, _ = learner.score("GE", pairs)
    assert 0 < np.abs(probs - fp32).max() < 0.1
