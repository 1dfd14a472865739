"""The learner against the real Redis registry: what it records, and what it refuses to record."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from registry_helpers import version_record

from worker.config import Settings
from worker.learn.history import fold_of
from worker.learn.learner import Abandoned, Learner, clean_partial_dirs
from worker.learn.model import new_click_model
from worker.learn.store import save_shared
from worker.state.registry import SHARED_SEGMENT, Registry
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
        }
    )
    registry = Registry.from_settings(small)
    learner = Learner(small, registry)
    shared = registry.shared()
    version = shared.next_version(SHARED_SEGMENT)
    path = save_shared(shared.adapter_dir(SHARED_SEGMENT, version), new_click_model(learner.backbone, 0))
    shared.record(version_record(SHARED_SEGMENT, version, str(path), scope="shared", events_to=0))
    return learner


def test_a_training_of_a_lost_partition_records_nothing(learner: Learner) -> None:
    events = [e for e in load_homedepot().stream() if e.segment == "GE"][:40]
    with pytest.raises(Abandoned):
        learner.train_segment("GE", events[20:], events[:20], (21, 40), still_owned=lambda: False)
    assert learner.registry.versions("GE") == []
    out = learner.train_segment("GE", events[20:], events[:20], (21, 40), still_owned=lambda: True)
    assert out is not None
    rec, _ = out
    assert rec.version == 1 and rec.decision == "promoted" and learner.registry.champion_version("GE") == 1
    pairs = [(e.query, e.item_text) for e in events[:5]]
    probs, version = learner.score("GE", pairs)
    assert version == 1 and all(0.0 <= float(p) <= 1.0 for p in probs)
    again, _ = learner.score("GE", pairs)
    assert list(learner._composed) == [("GE", 1, learner.shared_version)]
    from worker.learn.train import score_segment

    uncached = score_segment(learner.backbone, learner.shared, learner.adapter("GE")[1], pairs)
    assert np.allclose(again, probs) and np.allclose(uncached, probs, atol=1e-6)


def test_partial_dirs_left_by_a_crash_are_removed(settings: Settings) -> None:
    store = settings.model_store
    (store / "abc" / ".00000003.tmp-deadbeef").mkdir(parents=True)
    (store / "abc" / "00000002").mkdir(parents=True)
    assert clean_partial_dirs(store) == 1
    assert [p.name for p in (store / "abc").iterdir()] == ["00000002"]


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
    out = learner.train_segment("GE", events[20:], events[:20], (21, 40))
    assert out is not None and out[0].decision == "promoted"
    assert learner.resident_adapters() == 1
    learner.evict("GE")
    learner.evict("not-resident")
    assert learner.resident_adapters() == 0
    version, adapter = learner.adapter("GE")
    assert version == 1 and adapter is not None and learner.resident_adapters() == 1
