"""Training and scoring speed of the worker's code path against a plain torch loop of the same model.

Both sides run in the same process on the same device, the same events, batch size and sequence length,
so the ratios show the worker's overhead (or gain: dynamic padding, length-sorted scoring), not the card.
Tokenisation is inside the timed region on both sides (the worker's token cache is emptied first).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from worker.commands import write_result
from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.learn import history, match
from worker.learn.backbone import Backbone, load_backbone
from worker.learn.click_model import ClickModel, new_click_model
from worker.learn.encoder import mean_pool
from worker.learn.scoring import score_pairs
from worker.learn.train import train_shared
from worker.learn.training_data import pairs_of
from worker.tools.bench.timing import sync, timed
from worker.tools.datasets import load_dataset


def _raw_tokens(backbone: Backbone, pairs: Sequence[tuple[str | None, str]], pad_to_max: bool) -> Any:
    return backbone.tokenizer(
        [q or "" for q, _ in pairs],
        [t for _, t in pairs],
        truncation=True,
        max_length=backbone.max_seq_len,
        padding="max_length" if pad_to_max else True,
        return_tensors="pt",
    )


def _raw_match(backbone: Backbone, pairs: Sequence[tuple[str | None, str]]) -> torch.Tensor | None:
    """The same match features the worker's model takes, computed per batch, or None when it takes none."""
    if not backbone.match_features:
        return None
    return torch.tensor([match.features(q, t) for q, t in pairs], dtype=torch.float32).to(backbone.device)


def _raw_history(
    table: history.QueryHistory | None,
    pairs: Sequence[tuple[str | None, str]],
    device: torch.device,
    folds: Sequence[int | None] | None = None,
) -> torch.Tensor | None:
    if table is None:
        return None
    return torch.from_numpy(table.features([q for q, _ in pairs], folds)).to(device)


def raw_train(backbone: Backbone, events: Sequence[ClickEvent], settings: Settings, epochs: int) -> float:
    """A textbook loop: AutoModel + linear head, AdamW, shuffled batches padded per batch; the match
    and query-history terms when the worker's model has them (the history counted from `events`,
    out of fold as the worker does)."""
    from transformers import AutoModel

    torch.manual_seed(settings.seed)
    encoder = AutoModel.from_pretrained(str(backbone.base_path), local_files_only=True).to(backbone.device)
    head = torch.nn.Linear(int(encoder.config.hidden_size), 1).to(backbone.device)
    wide = torch.nn.Linear(match.SIZE, 1, bias=False).to(backbone.device)
    past = torch.nn.Linear(history.SIZE, 1, bias=False).to(backbone.device)
    params = [*encoder.parameters(), *head.parameters(), *wide.parameters(), *past.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.shared_lr, weight_decay=settings.weight_decay)
    pairs = pairs_of(events)
    labels = torch.tensor([e.clicked for e in events], dtype=torch.float32)
    rng = np.random.default_rng(settings.seed)
    bs = settings.shared_batch_size
    encoder.train()
    sync(backbone.device)
    start = time.perf_counter()
    table = history.QueryHistory.from_events(events) if settings.query_history else None
    folds = [history.fold_of(e.event_id) for e in events]
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        for i in range(0, len(pairs), bs):
            idx = order[i : i + bs]
            batch = [pairs[int(j)] for j in idx]
            enc = _raw_tokens(backbone, batch, pad_to_max=False).to(backbone.device)
            features = _raw_match(backbone, batch)
            seen = _raw_history(table, batch, backbone.device, [folds[int(j)] for j in idx])
            with backbone.autocast():
                hidden = encoder(**enc).last_hidden_state
            logits = head(mean_pool(hidden.float(), enc["attention_mask"])).squeeze(-1)
            if features is not None:
                logits = logits + wide(features).squeeze(-1)
            if seen is not None:
                logits = logits + past(seen).squeeze(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels[idx].to(backbone.device)
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    sync(backbone.device)
    return time.perf_counter() - start


@torch.no_grad()
def raw_score(
    backbone: Backbone, model: ClickModel, pairs: Sequence[tuple[str | None, str]], bs: int
) -> float:
    """Input order, fixed-length (max_seq_len) padding: what a plain scoring loop does."""
    model.eval()
    sync(backbone.device)
    start = time.perf_counter()
    for i in range(0, len(pairs), bs):
        enc = _raw_tokens(backbone, pairs[i : i + bs], pad_to_max=True).to(backbone.device)
        features = _raw_match(backbone, pairs[i : i + bs])
        seen = _raw_history(model.query_history, pairs[i : i + bs], backbone.device)
        with backbone.autocast():
            hidden = model.encoder(**enc).last_hidden_state
            logits = model.head(mean_pool(hidden.float(), enc["attention_mask"])).squeeze(-1)
        if features is not None:
            logits = logits + model.match(features).squeeze(-1)
        if seen is not None:
            logits = logits + model.history(seen).squeeze(-1)
        torch.sigmoid(logits.float()).cpu().numpy()
    sync(backbone.device)
    return time.perf_counter() - start


def run_bench(
    settings: Settings, events: int = 512, epochs: int = 3, pairs: int = 4096, repeats: int = 3
) -> dict[str, Any]:
    """Median of `repeats` alternating timings per side, after one untimed warm-up of each.

    The warm-up takes the first CUDA kernels, allocator growth and library handles out of both sides'
    figures; alternating the order spreads clock and cache drift evenly.
    """
    stream = load_dataset("homedepot").stream()
    train_events = stream[:events]
    score_set = pairs_of(stream[events : events + pairs])
    backbone = load_backbone(settings)
    warm = new_click_model(backbone, settings.seed)
    if settings.query_history:
        warm.query_history = history.QueryHistory.from_events(train_events)
    run_settings = settings.model_copy(update={"shared_epochs": epochs})
    bs = 256

    def worker_train() -> None:
        backbone.clear_token_cache()
        result = train_shared(backbone, warm, train_events, [], [], run_settings)
        if result.decision == "failed":
            raise RuntimeError(f"worker training failed: {result.reason}")

    def worker_score() -> None:
        backbone.clear_token_cache()
        score_pairs(backbone, warm, score_set, batch_size=bs)

    runs: dict[str, list[float]] = {"train": [], "raw_train": [], "score": [], "raw_score": []}
    warm_up = settings.model_copy(update={"shared_epochs": 1})
    train_shared(backbone, warm, train_events[:128], [], [], warm_up)
    raw_train(backbone, train_events[:128], settings, 1)
    worker_score()
    raw_score(backbone, warm, score_set, bs)
    for r in range(repeats):
        for side in ("worker", "raw") if r % 2 == 0 else ("raw", "worker"):
            if side == "worker":
                runs["train"].append(timed(backbone.device, worker_train))
                runs["score"].append(timed(backbone.device, worker_score))
            else:
                runs["raw_train"].append(raw_train(backbone, train_events, settings, epochs))
                runs["raw_score"].append(raw_score(backbone, warm, score_set, bs))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    return {
        "raw_train_s": round(med["raw_train"], 3),
        "train_s": round(med["train"], 3),
        "train_ratio": round(med["train"] / med["raw_train"], 3),
        "raw_score_pairs_per_s": round(len(score_set) / med["raw_score"], 1),
        "score_pairs_per_s": round(len(score_set) / med["score"], 1),
        "score_ratio": round(med["raw_score"] / med["score"], 3),
        "device": str(backbone.device),
        "device_name": torch.cuda.get_device_name() if backbone.device.type == "cuda" else "cpu",
        "events": len(train_events),
        "epochs": epochs,
        "pairs": len(score_set),
        "repeats": repeats,
        "runs_s": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "train_batch_size": settings.shared_batch_size,
        "score_batch_size": bs,
        "max_seq_len": settings.max_seq_len,
        "match_features": settings.match_features,
        "query_history": settings.query_history,
        "torch_threads": torch.get_num_threads(),
        "notes": "medians over repeats after one warm-up of each side; "
        "train_ratio = train_s / raw_train_s (lower is better); "
        "score_ratio = score_pairs_per_s / raw_score_pairs_per_s (higher is better)",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=512, help="training events (default 512)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4096, help="pairs to score (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line last")


def cli_main(args: argparse.Namespace, settings: Settings | None = None) -> int:
    settings = settings or load_settings()
    result = run_bench(
        settings, events=args.events, epochs=args.epochs, pairs=args.pairs, repeats=args.repeats
    )
    write_result(result, args.json)
    return 0
