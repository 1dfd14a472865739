"""The click model on CPU: probabilities, determinism, zero-shot, and files plain `peft` can read."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from worker.config import Settings
from worker.events import ClickEvent
from worker.learn import history, match
from worker.learn.adapters import attach_lora, extract_adapter
from worker.learn.backbone import Backbone, Pair, load_backbone
from worker.learn.click_model import ClickModel, new_click_model
from worker.learn.encoder import mean_pool
from worker.learn.history import QueryHistory
from worker.learn.scoring import score_pairs, scoring_batches
from worker.learn.serving import serving_copy
from worker.learn.store import load_adapter, load_shared, save_adapter, save_shared
from worker.learn.train import score_segment
from worker.learn.training_data import pairs_of
from worker.learn.zero_shot import zero_shot_scores
from worker.tools.datasets import load_homedepot


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings(device="cpu", max_seq_len=32, batch_size=16, shared_batch_size=16)


@pytest.fixture(scope="module")
def backbone(settings: Settings) -> Backbone:
    return load_backbone(settings)


@pytest.fixture(scope="module")
def events() -> list[ClickEvent]:
    return load_homedepot().stream()[:40]


@pytest.fixture(scope="module")
def shared(backbone: Backbone, events: list[ClickEvent]) -> ClickModel:
    """A fresh model whose match and history weights are not zero and that has a query history, as
    after training."""
    model = new_click_model(backbone, seed=1)
    model.query_history = QueryHistory.from_events(events)
    with torch.no_grad():
        model.match.weight.copy_(torch.linspace(-1.0, 2.0, match.SIZE).unsqueeze(0))
        model.history.weight.copy_(torch.tensor([[1.5, -0.5, 0.25]]))
    return model


def test_scores_are_probabilities_in_input_order(
    backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    pairs = pairs_of(events)
    scores = score_pairs(backbone, shared, pairs, batch_size=7)
    assert scores.shape == (len(pairs),)
    assert np.all((scores > 0) & (scores < 1))
    reversed_scores = score_pairs(backbone, shared, pairs[::-1], batch_size=5)
    np.testing.assert_allclose(reversed_scores[::-1], scores, rtol=1e-5, atol=1e-6)
    no_query = score_pairs(backbone, shared, [(None, events[0].item_text), ("", events[0].item_text)])
    assert no_query[0] == pytest.approx(no_query[1])


def test_same_seed_same_model(backbone: Backbone, events: list[ClickEvent]) -> None:
    pairs = pairs_of(events[:10])
    a = score_pairs(backbone, new_click_model(backbone, seed=5), pairs)
    b = score_pairs(backbone, new_click_model(backbone, seed=5), pairs)
    np.testing.assert_array_equal(a, b)


def test_zero_shot_prefers_matching_text(backbone: Backbone, shared: ClickModel) -> None:
    scores = zero_shot_scores(
        backbone,
        shared.encoder,
        [("cordless drill", "DEWALT 20-Volt cordless drill kit"), ("ceiling fan", "toilet seat white")],
    )
    assert 0 < scores[1] < scores[0] < 1


def _random_adapter(shared: ClickModel) -> ClickModel:
    seg = attach_lora(shared, rank=4, alpha=8, dropout=0.0, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in seg.encoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        seg.calibration.copy_(torch.tensor([1.5, -0.2]))
    return seg


def test_adapter_round_trips_through_plain_peft(
    tmp_path: Path, backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    seg = _random_adapter(shared)
    adapter = extract_adapter(seg)
    shared_dir = save_shared(tmp_path / "shared", shared, {"version": 1})
    adapter_dir = save_adapter(tmp_path / "seg" / "1", adapter, {"segment": "GE", "version": 1})
    assert {p.name for p in adapter_dir.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "meta.json",
    }
    assert not [p for p in (tmp_path / "seg").iterdir() if p.name.startswith(".")]
    with pytest.raises(OSError):
        save_adapter(adapter_dir, adapter, {})

    pairs = pairs_of(events[:12])
    ours = score_segment(backbone, shared, adapter, pairs)
    np.testing.assert_allclose(ours, score_pairs(backbone, seg, pairs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, score_pairs(backbone, shared, pairs), atol=1e-3)

    encoder = PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(shared_dir / "encoder")), str(adapter_dir)
    )
    encoder.eval()
    head = load_file(str(shared_dir / "head.safetensors"))
    calibration = load_file(str(adapter_dir / "head.safetensors"))["calibration"]
    enc = backbone.tokenizer(
        [q for q, _ in pairs],
        [t for _, t in pairs],
        truncation=True,
        max_length=32,
        padding=True,
        return_tensors="pt",
    )
    features = torch.tensor([match.features(q, t) for q, t in pairs])
    table = json.loads((shared_dir / history.FILE).read_text())
    rows = dict(zip(table["keys"], table["counts"], strict=True))
    clicks_all, events_all = np.asarray(table["counts"]).reshape(-1, 2).sum(0)
    base = (clicks_all + 1) / (events_all + 2)
    past = []
    for q, _ in pairs:
        clicks, n = np.asarray(rows[history.query_key(q)]).reshape(-1, 2).sum(0)
        rate = (clicks + history.SMOOTHING * base) / (n + history.SMOOTHING)
        past.append([np.log(rate / (1 - rate)) - np.log(base / (1 - base)), np.log1p(n) / 4, 1.0])
    with torch.no_grad():
        pooled = mean_pool(encoder(**enc).last_hidden_state, enc["attention_mask"])
        logits = (
            pooled @ head["head.weight"].T
            + head["head.bias"]
            + features @ head["match.weight"].T
            + torch.tensor(past, dtype=torch.float32) @ head["history.weight"].T
        )
        plain = torch.sigmoid(logits.squeeze(-1) * calibration[0] + calibration[1]).numpy()
    np.testing.assert_allclose(plain, ours, rtol=1e-4, atol=1e-5)

    loaded, meta = load_adapter(adapter_dir)
    assert meta == {"segment": "GE", "version": 1}
    np.testing.assert_allclose(score_segment(backbone, shared, loaded, pairs), ours, rtol=1e-6)
    reloaded_shared, shared_meta = load_shared(shared_dir, backbone)
    assert shared_meta == {"version": 1}
    np.testing.assert_allclose(
        score_pairs(backbone, reloaded_shared, pairs), score_pairs(backbone, shared, pairs), rtol=1e-6
    )


def test_match_features_move_scores_and_can_be_switched_off(
    settings: Settings, backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    pairs = pairs_of(events[:12])
    plain_backbone = load_backbone(settings.model_copy(update={"match_features": False}))
    lexical = copy.deepcopy(shared)
    lexical.query_history = None
    with_features = score_pairs(backbone, lexical, pairs)
    without = score_pairs(plain_backbone, lexical, pairs)
    assert not np.allclose(with_features, without, atol=1e-3)
    zeroed = new_click_model(backbone, seed=1)
    np.testing.assert_allclose(score_pairs(backbone, zeroed, pairs), without, rtol=1e-5, atol=1e-6)


def test_a_backbone_without_match_features_is_the_plain_one(
    settings: Settings, backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    """What the evaluation's naive procedure uses: the same tokenizer, no match features, its own cache."""
    pairs = pairs_of(events[:12])
    lexical = copy.deepcopy(shared)
    lexical.query_history = None
    before = score_pairs(backbone, lexical, pairs)
    plain = backbone.without_match_features()
    assert plain.match_features is False and backbone.match_features is True
    assert plain.tokenizer is backbone.tokenizer and plain.device == backbone.device
    assert all(row.match is None for row in plain.encode(pairs))
    assert all(row.match is not None for row in backbone.encode(pairs))
    loaded = load_backbone(settings.model_copy(update={"match_features": False}))
    np.testing.assert_allclose(score_pairs(plain, lexical, pairs), score_pairs(loaded, lexical, pairs))
    np.testing.assert_array_equal(score_pairs(backbone, lexical, pairs), before)
    backbone.clear_token_cache()
    np.testing.assert_array_equal(score_pairs(backbone, lexical, pairs), before)


def test_importing_the_model_changes_no_environment_and_loading_is_offline(settings: Settings) -> None:
    """The Hugging Face environment is set by loading, before huggingface_hub reads it (at its import)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
    code = (
        "import os, sys, json\n"
        "import worker.learn.adapters, worker.learn.scoring, worker.learn.serving, worker.learn.zero_shot\n"
        "import worker.learn.backbone as backbone\n"
        f"names = {names!r}\n"
        "imported = {n: os.environ.get(n) for n in names}\n"
        "from worker.config import Settings\n"
        "backbone.load_backbone(Settings(device='cpu'))\n"
        "import huggingface_hub.constants as hub\n"
        "loaded = {n: os.environ.get(n) for n in names}\n"
        "print(json.dumps([imported, loaded, hub.HF_HUB_OFFLINE]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    imported, loaded, offline = json.loads(out.stdout.strip().splitlines()[-1])
    assert imported == dict.fromkeys(names)
    assert loaded == {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert offline is True


def test_a_shared_model_saved_without_match_or_history_loads_as_the_plain_model(
    tmp_path: Path, backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    """Shared models written before the match features and the query history keep serving exactly
    as they did."""
    from safetensors.torch import load_file, save_file

    directory = save_shared(tmp_path / "old", shared, {})
    head = load_file(str(directory / "head.safetensors"))
    save_file({k: v for k, v in head.items() if k.startswith("head.")}, str(directory / "head.safetensors"))
    (directory / history.FILE).unlink()
    loaded, _ = load_shared(directory, backbone)
    assert torch.count_nonzero(loaded.match.weight) == 0
    assert torch.count_nonzero(loaded.history.weight) == 0 and loaded.query_history is None
    pairs = pairs_of(events[:12])
    plain = load_backbone(Settings(device="cpu", max_seq_len=32, match_features=False))
    cross_encoder = copy.deepcopy(shared)
    cross_encoder.query_history = None
    np.testing.assert_allclose(
        score_pairs(backbone, loaded, pairs), score_pairs(plain, cross_encoder, pairs), rtol=1e-5, atol=1e-6
    )


def test_query_history_moves_scores_survives_saving_and_is_shared_not_copied(
    tmp_path: Path, backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    pairs = pairs_of(events[:12])
    with_history = score_pairs(backbone, shared, pairs)
    without = copy.deepcopy(shared)
    assert without.query_history is shared.query_history
    without.query_history = None
    assert not np.allclose(score_pairs(backbone, without, pairs), with_history, atol=1e-3)
    loaded, _ = load_shared(save_shared(tmp_path / "shared", shared, {}), backbone)
    assert loaded.query_history is not None
    np.testing.assert_allclose(score_pairs(backbone, loaded, pairs), with_history, rtol=1e-5, atol=1e-6)
    seg = attach_lora(shared, rank=4, alpha=8, dropout=0.0, seed=0)
    assert seg.query_history is shared.query_history and not seg.history.weight.requires_grad


def _reference_probabilities(
    backbone: Backbone, model: ClickModel, pairs: list[Pair], folds: list[int | None] | None = None
) -> np.ndarray:
    """Scoring written out plainly, as it was before the pipeline: one pair at a time, no cache, no
    padding, no producer thread, the model's own forward (a PEFT-composed model for an adapter)."""
    out = []
    model.eval()
    for i, (query, text) in enumerate(pairs):
        if query:
            enc = backbone.tokenizer(
                query, text, truncation="longest_first", max_length=backbone.max_seq_len, return_tensors="pt"
            )
        else:
            enc = backbone.tokenizer(
                text, truncation=True, max_length=backbone.max_seq_len, return_tensors="pt"
            )
        batch = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
        batch["match"] = torch.tensor([match.features(query, text)], dtype=torch.float32)
        if model.query_history is not None:
            fold = None if folds is None else [folds[i]]
            batch["history"] = torch.from_numpy(model.query_history.features([query], fold))
        with torch.no_grad():
            out.append(float(torch.sigmoid(model(batch))[0]))
    return np.asarray(out)


@pytest.fixture(scope="module")
def scoring_pairs(events: list[ClickEvent]) -> list[Pair]:
    """Real pairs and the awkward ones: no query, an empty query, a duplicate, one over max_seq_len."""
    pairs = pairs_of(events[:24])
    long_text = " ".join(e.item_text for e in events[:6])
    return [
        *pairs,
        (None, events[0].item_text),
        ("", events[1].item_text),
        pairs[3],
        (events[2].query, long_text),
    ]


def test_scores_equal_the_plain_reference_within_1e_4(
    backbone: Backbone, shared: ClickModel, events: list[ClickEvent], scoring_pairs: list[Pair]
) -> None:
    """The pipelined scoring (cache, vectorised collate, producer thread, merged LoRA) changes no score by
    more than 1e-4: shared model with match features and query history, and shared + an adapter."""
    folds = [history.fold_of(e.event_id) for e in events[:24]] + [None] * 4
    reference = _reference_probabilities(backbone, shared, scoring_pairs, folds)
    seg = _random_adapter(shared)
    adapter = extract_adapter(seg)
    composed = _reference_probabilities(backbone, seg, scoring_pairs, folds)
    assert np.abs(composed - reference).max() > 1e-3  # the adapter moves scores, so the check below can fail
    served = serving_copy(shared, adapter)
    for prefetch in (False, True):
        for batch_size in (1, 5, None):
            backbone.clear_token_cache()
            cold = score_pairs(backbone, shared, scoring_pairs, batch_size, folds, prefetch)
            warm = score_pairs(backbone, shared, scoring_pairs, batch_size, folds, prefetch)
            np.testing.assert_allclose(cold, reference, rtol=0, atol=1e-4)
            np.testing.assert_allclose(warm, cold, rtol=0, atol=1e-6)
            merged = score_pairs(backbone, served, scoring_pairs, batch_size, folds, prefetch)
            np.testing.assert_allclose(merged, composed, rtol=0, atol=1e-4)
    without_folds = score_pairs(backbone, shared, scoring_pairs)
    np.testing.assert_allclose(
        without_folds, _reference_probabilities(backbone, shared, scoring_pairs), atol=1e-4
    )
    assert score_pairs(backbone, shared, []).shape == (0,)


def test_a_served_copy_merges_the_lora_and_shares_every_other_tensor(
    backbone: Backbone, shared: ClickModel
) -> None:
    seg = _random_adapter(shared)
    adapter = extract_adapter(seg)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    served = serving_copy(shared, adapter)
    assert not any("lora" in name for name, _ in served.named_modules())
    assert (
        served.encoder.embeddings.word_embeddings.weight is shared.encoder.embeddings.word_embeddings.weight
    )
    assert served.head.weight is shared.head.weight and served.query_history is shared.query_history
    query = served.encoder.encoder.layer[0].attention.self.query
    assert query.weight is not shared.encoder.encoder.layer[0].attention.self.query.weight
    assert query.bias is shared.encoder.encoder.layer[0].attention.self.query.bias
    assert torch.equal(served.calibration, adapter.calibration) and not served.training
    after = shared.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert serving_copy(shared) is shared  # on a CPU, the shared model serves as it is
    assert shared.encoder.config._attn_implementation == "sdpa"

    wrong = replace(
        adapter, lora={**adapter.lora, "base_model.model.embeddings.LayerNorm.lora_A.weight": torch.zeros(1)}
    )
    with pytest.raises(ValueError, match="does not fit"):
        serving_copy(shared, wrong)
    key = next(k for k in adapter.lora if k.endswith("lora_A.weight"))
    with pytest.raises(ValueError, match="does not fit"):
        serving_copy(shared, replace(adapter, lora={**adapter.lora, key: torch.zeros(3, 3)}))


class _CountingTokenizer:
    """The real tokenizer, counting the texts it is asked to tokenise."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts = 0

    def __call__(self, first: list[str], *rest: Any, **kwargs: Any) -> Any:
        self.texts += len(first)
        return self.tokenizer(first, *rest, **kwargs)


def test_the_token_cache_is_a_bounded_lru_keyed_by_content(
    backbone: Backbone, scoring_pairs: list[Pair]
) -> None:
    counting = _CountingTokenizer(backbone.tokenizer)
    small = replace(backbone, tokenizer=counting, cache_rows=3, _tokens=OrderedDict(), _lock=threading.Lock())
    a, b, c, d = scoring_pairs[:4]
    rows = small.encode([a, b, a, c])
    assert counting.texts == 3 and small.cached_rows() == 3
    assert rows[0] is rows[2]
    small.encode([a])  # a is now the most recently used, b the least
    assert counting.texts == 3
    small.encode([d])
    assert counting.texts == 4 and small.cached_rows() == 3
    small.encode([a, c, d])
    assert counting.texts == 4
    small.encode([b])
    assert counting.texts == 5
    wide = replace(backbone, tokenizer=counting, _tokens=OrderedDict(), _lock=threading.Lock())
    first = wide.encode(scoring_pairs)
    seen = counting.texts
    again = wide.encode(list(reversed(scoring_pairs)))
    assert counting.texts == seen  # a refresh of the same candidates tokenises nothing
    assert [r.ids.tolist() for r in again[::-1]] == [r.ids.tolist() for r in first]


def test_collate_pads_each_batch_to_its_longest_row(backbone: Backbone, scoring_pairs: list[Pair]) -> None:
    rows = backbone.encode(scoring_pairs[:6])
    table = np.arange(6 * history.SIZE, dtype=np.float32).reshape(6, history.SIZE)
    batch = backbone.collate(rows, table)
    width = max(len(r.ids) for r in rows)
    assert batch["input_ids"].shape == (6, width) and batch["input_ids"].dtype == torch.long
    for i, row in enumerate(rows):
        n = len(row.ids)
        assert batch["input_ids"][i, :n].tolist() == row.ids.tolist()
        assert batch["token_type_ids"][i, :n].tolist() == row.types.tolist()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert int(batch["input_ids"][i, n:].abs().sum()) == 0
    assert batch["match"].shape == (6, match.SIZE)
    np.testing.assert_array_equal(
        batch["match"].numpy(), np.stack([r.match for r in rows if r.match is not None])
    )
    np.testing.assert_array_equal(batch["history"].numpy(), table)


def test_scoring_batches_bound_pairs_and_padded_tokens() -> None:
    lengths = np.array([5, 40, 7, 64, 64, 12, 30, 3] * 50)
    plain = scoring_batches(lengths, 16)
    assert [len(b) for b in plain] == [16] * 25
    budget = scoring_batches(lengths, 128, max_tokens=1024)
    assert sorted(np.concatenate(budget).tolist()) == list(range(len(lengths)))
    assert all(len(b) <= 128 and len(b) * lengths[b].max() <= 1024 for b in budget)
    assert all(lengths[b].max() <= lengths[n].min() for b, n in itertools.pairwise(budget))
    assert [len(b) for b in scoring_batches(np.array([100, 100]), 8, max_tokens=10)] == [1, 1]


def test_an_error_in_the_producer_thread_reaches_the_caller(backbone: Backbone, shared: ClickModel) -> None:
    class Broken:
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("tokeniser broke")

    broken = replace(backbone, tokenizer=Broken(), _tokens=OrderedDict(), _lock=threading.Lock())
    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="tokeniser broke"):
        score_pairs(broken, shared, [("drill", "cordless drill")], prefetch=True)
    assert threading.active_count() == threads
    assert not any(t.name == "score-prefetch" for t in threading.enumerate())


def test_an_int8_copy_quantises_the_encoder_scores_close_and_leaves_the_model_as_it_was(
    backbone: Backbone, shared: ClickModel, events: list[ClickEvent]
) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from worker.learn.serving import quantized_copy, served_copy

    pairs = [(e.query, e.item_text) for e in events[:24]]
    before = score_pairs(backbone, shared, pairs)
    int8 = quantized_copy(shared)
    kinds = {type(m) for m in int8.encoder.modules()}
    assert DynamicLinear in kinds and nn.Linear not in kinds
    assert isinstance(shared.head, nn.Linear) and any(
        isinstance(m, nn.Linear) for m in shared.encoder.modules()
    )
    assert int8.query_history is shared.query_history
    probs = score_pairs(backbone, int8, pairs)
    assert 0 < np.abs(probs - before).max() < 0.1
    assert np.array_equal(score_pairs(backbone, shared, pairs), before), "the fp32 model is untouched"
    assert served_copy(shared, None, int8=False) is shared
