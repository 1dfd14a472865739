"""Training on CPU with tiny slices: the loss falls, the gate holds, failures are results, seeds repeat."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import structlog
import torch

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn import history, match, train
from worker.learn.adapters import attach_lora, with_adapter
from worker.learn.backbone import Backbone, load_backbone
from worker.learn.click_model import ClickModel, new_click_model
from worker.learn.fit import FitOptions, NonFiniteLoss, evaluate_model, fit, probabilities
from worker.learn.gate import GateRules, Scored, judge
from worker.learn.history import QueryHistory
from worker.learn.scoring import score_pairs
from worker.learn.train import train_segment_adapter, train_shared
from worker.learn.training_data import (
    labels_of,
    pairs_of,
    sample_replay,
    segment_training_data,
    shared_training_data,
    split_holdout,
)
from worker.ops.quality import auc
from worker.tools.datasets import load_homedepot


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(
        device="cpu",
        max_seq_len=32,
        batch_size=16,
        shared_batch_size=16,
        adapter_epochs=2,
        shared_epochs=1,
        lora_rank=4,
    )


@pytest.fixture(scope="module")
def backbone(settings: Settings) -> Backbone:
    return load_backbone(settings)


@pytest.fixture(scope="module")
def events() -> list[ClickEvent]:
    return load_homedepot().stream()[:96]


@pytest.fixture(scope="module")
def shared(backbone: Backbone, settings: Settings, events: list[ClickEvent]) -> ClickModel:
    result = train_shared(backbone, None, events[:64], [], events[64:], settings)
    assert result.shared is not None
    return result.shared


def test_fit_loss_falls(backbone: Backbone, events: list[ClickEvent]) -> None:
    model = new_click_model(backbone, seed=0)
    options = FitOptions(lr=3e-4, epochs=6, batch_size=16, weight_decay=0.01, seed=0)
    losses = fit(backbone, model, events[:32], options).losses
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05


def test_early_stopping_keeps_the_best_epoch(backbone: Backbone, events: list[ClickEvent]) -> None:
    """A holdout that is the training set with every label flipped gets worse with every epoch: training
    stops after `patience` epochs without a better holdout log loss, and epoch 1's weights come back."""
    train = events[:32]
    flipped = [
        e.model_copy(update={"event_id": f"flip-{e.event_id}", "clicked": 1 - e.clicked}) for e in train
    ]
    options = FitOptions(lr=3e-4, epochs=6, batch_size=16, weight_decay=0.01, seed=0, patience=2)
    model = new_click_model(backbone, seed=0)
    fitted = fit(backbone, model, train, options, holdout=flipped)
    assert fitted.kept_epoch == 1 and fitted.epochs == 3
    assert fitted.holdout_logloss == sorted(fitted.holdout_logloss) and len(fitted.losses) == 6
    assert evaluate_model(backbone, model, flipped).logloss == pytest.approx(fitted.holdout_logloss[0])

    no_stopping = dataclasses.replace(options, patience=0)
    without = fit(backbone, new_click_model(backbone, seed=0), train, no_stopping, holdout=flipped)
    assert (without.epochs, without.kept_epoch, without.holdout_logloss) == (6, 6, [])
    assert without.losses[:6] == fitted.losses


def test_train_shared_measures_holdout(
    backbone: Backbone, settings: Settings, events: list[ClickEvent]
) -> None:
    result = train_shared(backbone, None, events[:48], events[48:64], events[64:], settings)
    assert result.decision in {"promoted", "rejected"}
    assert result.challenger is not None and result.champion is not None
    assert result.challenger.n == result.champion.n == 32
    assert math.isfinite(result.challenger.logloss)
    assert result.challenger.auc is not None and 0 <= result.challenger.auc <= 1
    assert result.n_train == 64 and len(result.losses) == 4
    assert result.device == "cpu" and result.train_seconds > 0


def test_gate_rejects_broken_challenger(
    backbone: Backbone, settings: Settings, shared: ClickModel, events: list[ClickEvent]
) -> None:
    holdout = events[64:]
    broken = new_click_model(backbone, seed=0)
    broken.load_state_dict(shared.state_dict())
    with torch.no_grad():
        broken.head.weight.neg_()
        broken.head.bias.neg_()
    good, bad = probabilities(backbone, shared, holdout), probabilities(backbone, broken, holdout)
    labels = labels_of(holdout)
    good_auc, bad_auc = auc(labels, good), auc(labels, bad)
    assert good_auc is not None and bad_auc is not None
    champion, challenger = (good, bad) if good_auc > bad_auc else (bad, good)
    unseen = np.zeros(len(holdout), dtype=bool)
    ok, reason = judge(Scored(labels, challenger, champion, unseen), GateRules.for_segment(settings))
    assert not ok and "AUC" in reason

    flipped = [e.model_copy(update={"clicked": 1 - e.clicked}) for e in events[:64]]
    strong = settings.model_copy(update={"calibration_lr": 1.0, "adapter_epochs": 4})
    result = train_segment_adapter(backbone, shared, None, flipped, [], holdout, strong)
    assert result.decision == "rejected", result.reason
    assert result.adapter is not None and result.challenger is not None


def test_nan_and_errors_are_failed_results(
    backbone: Backbone, settings: Settings, shared: ClickModel, events: list[ClickEvent]
) -> None:
    poisoned = new_click_model(backbone, seed=0)
    with torch.no_grad():
        poisoned.head.weight.fill_(float("nan"))
    with structlog.testing.capture_logs() as logs:
        result = train_shared(backbone, poisoned, events[:16], [], events[64:80], settings)
    assert result.decision == "failed" and "loss" in result.reason
    assert result.shared is None and result.challenger is None
    failed = [e for e in logs if e["event"] == "training failed"]
    assert len(failed) == 1 and failed[0]["log_level"] == "error" and failed[0]["scope"] == "shared"
    assert isinstance(failed[0]["exc_info"], NonFiniteLoss), "the traceback must reach the log"

    seg = train_segment_adapter(backbone, poisoned, None, events[:16], [], events[64:80], settings)
    assert seg.decision == "failed" and seg.adapter is None

    ok = train_segment_adapter(backbone, shared, None, events[:16], [], events[64:80], settings)
    assert ok.adapter is not None
    wrong_rank = settings.model_copy(update={"lora_rank": 2})
    other = train_segment_adapter(backbone, shared, None, events[:16], [], events[64:80], wrong_rank)
    assert other.adapter is not None
    bad_adapter = ok.adapter
    bad_adapter.lora = {k.replace("query", "nonexistent"): v for k, v in other.adapter.lora.items()}
    broken = train_segment_adapter(backbone, shared, bad_adapter, events[:16], [], events[64:80], settings)
    assert broken.decision == "failed" and broken.reason


def test_same_seed_same_adapter(
    backbone: Backbone, settings: Settings, shared: ClickModel, events: list[ClickEvent]
) -> None:
    runs = [
        train_segment_adapter(backbone, shared, None, events[:24], events[24:32], events[64:80], settings)
        for _ in range(2)
    ]
    assert runs[0].losses == runs[1].losses
    a, b = runs[0].adapter, runs[1].adapter
    assert a is not None and b is not None
    assert a.lora.keys() == b.lora.keys()
    for key in a.lora:
        assert torch.equal(a.lora[key], b.lora[key])
    assert torch.equal(a.calibration, b.calibration)
    assert runs[0].challenger == runs[1].challenger


def test_shared_run_learns_match_weights_and_adapters_keep_them(
    backbone: Backbone, settings: Settings, shared: ClickModel, events: list[ClickEvent]
) -> None:
    """The match weights start at zero and belong to the shared model: its runs learn them at
    `match_lr`, a segment's adapter trains on top of them without changing them."""
    assert torch.count_nonzero(new_click_model(backbone, seed=0).match.weight) == 0
    learned = dict(zip(match.NAMES, shared.match.weight[0].tolist(), strict=True))
    assert learned.pop("no_query") == 0.0  # every training pair has a query: no gradient there
    assert all(abs(w) > 1e-3 for w in learned.values()), learned
    seg = attach_lora(shared, settings.lora_rank, settings.lora_alpha, 0.0, settings.seed)
    assert not seg.match.weight.requires_grad
    result = train_segment_adapter(backbone, shared, None, events[:24], [], events[64:80], settings)
    assert result.adapter is not None and result.losses
    assert not [k for k in result.adapter.lora if "match" in k]
    assert torch.equal(with_adapter(shared, result.adapter).match.weight, shared.match.weight)


@pytest.fixture(scope="module")
def repeated() -> list[ClickEvent]:
    """Events whose queries come back (the stream's first ones are all different queries)."""
    stream = load_homedepot().stream()[:3000]
    counts = Counter(e.query for e in stream)
    return [e for e in stream if counts[e.query] >= 4][:96]


def test_shared_run_counts_a_query_history_and_learns_its_weights(
    backbone: Backbone, settings: Settings, repeated: list[ClickEvent]
) -> None:
    """Each shared run gets a new table counted from the events it was given (`counted`); its weights
    start at zero, are learned by shared runs only, and switch off with `query_history`."""
    events = repeated
    assert torch.count_nonzero(new_click_model(backbone, seed=0).history.weight) == 0
    first = train_shared(backbone, None, events[:64], [], events[64:], settings)
    shared = first.shared
    assert shared is not None and shared.query_history is not None
    assert shared.query_history.events == len(events)
    learned = dict(zip(history.NAMES, shared.history.weight[0].tolist(), strict=True))
    assert all(abs(w) > 1e-3 for w in learned.values()), learned
    result = train_segment_adapter(backbone, shared, None, events[:24], [], events[64:80], settings)
    assert result.adapter is not None and not [k for k in result.adapter.lora if "history" in k]
    served = with_adapter(shared, result.adapter)
    assert torch.equal(served.history.weight, shared.history.weight)
    assert served.query_history is shared.query_history

    again = train_shared(backbone, shared, events[:32], [], events[64:], settings, counted=events[:10])
    assert again.shared is not None and again.shared.query_history is not None
    assert again.shared.query_history.events == 10 and shared.query_history.events == len(events)
    view = copy.copy(shared)
    view.query_history = again.shared.query_history
    assert again.champion == evaluate_model(backbone, view, events[64:]), "the champion read the new table"
    assert again.champion != evaluate_model(backbone, shared, events[64:]), "and not its own"
    assert shared.query_history.events == len(events), "the champion itself is left as it was"
    off = settings.model_copy(update={"query_history": False})
    plain = train_shared(backbone, None, events[:32], [], events[64:], off)
    assert plain.shared is not None and plain.shared.query_history is None
    assert torch.count_nonzero(plain.shared.history.weight) == 0


def test_holdout_events_are_scored_out_of_fold(
    backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    """A table that counted only the holdout events themselves tells the gate nothing: every event's
    own fold is left out, so its score is the one without a table."""
    held = list({e.query: e for e in events}.values())[:12]
    model = copy.deepcopy(shared)
    with torch.no_grad():
        model.history.weight.copy_(torch.tensor([[1.5, -0.5, 0.25]]))
    model.query_history = QueryHistory.from_events(held)
    blind = copy.deepcopy(model)
    blind.query_history = None
    assert evaluate_model(backbone, model, held) == evaluate_model(backbone, blind, held)
    pairs = pairs_of(held)
    assert not np.allclose(score_pairs(backbone, model, pairs), score_pairs(backbone, blind, pairs))


def test_holdout_split_is_stable_and_replay_seeded(events: list[ClickEvent]) -> None:
    train, held = split_holdout(events, 0.25)
    assert len(train) + len(held) == len(events) and 0 < len(held) < len(events)
    _, again_held = split_holdout(list(reversed(events)), 0.25)
    assert {e.event_id for e in held} == {e.event_id for e in again_held}
    assert sample_replay(events, 10, 3) == sample_replay(events, 10, 3)
    sample = sample_replay(events, 10, 3)
    assert len(sample) == 10 and sample == sorted(sample, key=events.index)
    assert sample_replay(events, 1000, 3) == events


def test_shared_training_data_does_not_depend_on_the_order_it_is_gathered_in() -> None:
    """The group's trainer gathers events partition by partition, the offline simulation in stream order:
    the same events in another order must give the same rows, replay sample and holdouts."""
    stream = load_homedepot().stream()[:600]
    settings = Settings(device="cpu", shared_replay_frac=0.5, shared_holdout_frac=0.2)
    new, older = stream[400:], stream[:400]
    rng = np.random.default_rng(1)
    shuffled_new = [new[int(i)] for i in rng.permutation(len(new))]
    shuffled_older = [older[int(i)] for i in rng.permutation(len(older))]
    a = shared_training_data(new, older, settings, 3)
    b = shared_training_data(shuffled_new, shuffled_older, settings, 3)

    def ids(events: list[ClickEvent]) -> list[str]:
        return [e.event_id for e in events]

    assert len(a.replay) == round(len(a.new) * 0.5) > 0 and a.holdout
    for part in ("new", "replay", "holdout", "unseen", "counted"):
        assert ids(getattr(a, part)) == ids(getattr(b, part)), part
    c = shared_training_data(new, older, settings, 4)
    assert ids(c.replay) != ids(a.replay), "the run number seeds the replay sample"


def test_the_epoch_is_picked_on_events_the_gate_never_judges_on(
    backbone: Backbone, settings: Settings, shared: ClickModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pairs that pick the epoch overstate its win (winner's curse): a segment training stops early on
    a slice of its own training events, apart from the gate's seen and unseen pairs, in every run."""
    stream = [e for e in load_homedepot().stream() if e.segment == "GE"][:160]
    s = settings.model_copy(update={"early_stopping_patience": 1, "early_stopping_frac": 0.2})
    data = segment_training_data(stream[80:], stream[:80], s, run=1)
    ids = {
        name: {e.event_id for e in getattr(data, name)}
        for name in ("new", "replay", "holdout", "unseen", "stop")
    }
    assert ids["stop"] and ids["holdout"]
    for name in ("new", "replay", "holdout", "unseen"):
        assert not ids["stop"] & ids[name], name
    again = segment_training_data(stream[100:], stream[:100], s, run=2)
    assert {e.event_id for e in again.stop} >= ids["stop"] & {e.event_id for e in stream[:100]}, "stable"
    off = segment_training_data(
        stream[80:], stream[:80], s.model_copy(update={"early_stopping_patience": 0}), 1
    )
    assert off.stop == []

    judged: list[set[str]] = []
    real_fit = train.fit

    def spy(*args: object, **kwargs: object) -> object:
        judged.append({e.event_id for e in kwargs["holdout"]})  # type: ignore[attr-defined]
        return real_fit(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train, "fit", spy)
    result = train_segment_adapter(
        backbone, shared, None, data.new, data.replay, data.holdout, s, unseen=data.unseen, stop=data.stop
    )
    assert judged == [ids["stop"]]
    assert result.challenger is not None and result.challenger.n == len(data.holdout) + len(data.unseen)
    assert result.serving is not None and result.serving.n == len(data.unseen), "chosen on unseen queries"
