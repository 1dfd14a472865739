"""Batched scoring of (query, item_text) pairs: length-sorted batches capped in pairs and padded tokens,
host work (tokenising, features, padding) in a producer thread ahead of the forward on a GPU."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from worker.learn.backbone import Backbone, Pair
from worker.learn.click_model import ClickModel

SCORE_BATCH = {"cuda": 4096, "cpu": 256}
"""Most pairs per scoring batch. A GPU needs large batches to run at its rate; a CPU gains nothing past a
few hundred (and its activations outgrow the caches)."""
SCORE_BATCH_TOKENS = {"cuda": 131_072}
"""Most padded tokens per scoring batch: on a GPU, length buckets of 2,048 pairs at length 64 up to 4,096
at length 32 and below (activation memory stays bounded however long the pairs are)."""
SCORE_CHUNK = 2048
"""Pairs encoded and length-sorted together by the producer: the first batch waits for one chunk only."""
PREFETCH_DEPTH = 3


def scoring_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches of at most `batch_size` pairs and, when given,
    `max_tokens` padded tokens (each batch pads to its own longest row)."""
    order = np.argsort(lengths, kind="stable")
    if max_tokens is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    widths = lengths[order]
    batches = []
    start = 0
    while start < len(order):
        ends = np.arange(start + 1, min(start + batch_size, len(order)) + 1)
        fits = (ends - start) * widths[ends - 1] <= max_tokens
        end = int(ends[max(0, int(np.count_nonzero(fits)) - 1)])
        batches.append(order[start:end])
        start = end
    return batches


class _Failed(NamedTuple):
    error: BaseException


_DONE = object()


class _Prefetched:
    """Items of `source`, made by a thread up to `depth` ahead of the consumer: tokenising (Rust) and
    numpy release the GIL, so host work for the next batches overlaps this one's forward. An error in the
    thread is raised in the consumer; `close` stops the thread."""

    def __init__(self, source: Iterator[Any], depth: int = PREFETCH_DEPTH) -> None:
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="score-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(_Failed(exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def prepared_batches(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    folds: Sequence[int | None] | None,
    batch_size: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Host side of scoring, chunk by chunk: encode (cache first), match and history features,
    length-sorted batches packed on the host (pinned on CUDA), each with its positions in `pairs`."""
    pin = backbone.device.type == "cuda"
    chunk = max(SCORE_CHUNK, 2 * batch_size)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        rows = backbone.encode(part)
        hist = model.history_features(part, None if folds is None else folds[start : start + chunk])
        lengths = np.fromiter((len(r.ids) for r in rows), dtype=np.int64, count=len(rows))
        for idx in scoring_batches(lengths, batch_size, max_tokens):
            index = torch.from_numpy(idx + start)
            packed = backbone.pack([rows[i] for i in idx], None if hist is None else hist[idx], pin)
            yield (index.pin_memory() if pin else index), packed


def score_logits(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    batch_size: int | None = None,
    folds: Sequence[int | None] | None = None,
    prefetch: bool | None = None,
) -> np.ndarray:
    """Logits in input order; `folds` when the pairs are events (see `ClickModel.history_features`).

    The host work (tokenising, features, padding) runs in a producer thread when `prefetch` (default: on
    a GPU), feeding the forward pre-collated batches; logits stay on the device until one copy at the
    end. `batch_size` caps the pairs per batch (default `SCORE_BATCH` for the device)."""
    device = backbone.device
    if not pairs:
        return np.zeros(0, dtype=np.float64)
    size = batch_size or SCORE_BATCH.get(device.type, SCORE_BATCH["cpu"])
    source = prepared_batches(backbone, model, pairs, folds, size, SCORE_BATCH_TOKENS.get(device.type))
    producer = _Prefetched(source) if (device.type == "cuda" if prefetch is None else prefetch) else None
    out = torch.empty(len(pairs), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), backbone.autocast():
            for index, host in producer if producer is not None else source:
                logits = model(backbone.to_device(host))
                out[index.to(device, non_blocking=True)] = logits.float()
            result = out.cpu().numpy().astype(np.float64)
    finally:
        if producer is not None:
            producer.close()
        model.train(was_training)
    return result


def score_pairs(
    backbone: Backbone,
    model: ClickModel,
    pairs: Sequence[Pair],
    batch_size: int | None = None,
    folds: Sequence[int | None] | None = None,
    prefetch: bool | None = None,
) -> np.ndarray:
    """Click probabilities for (query, item_text) pairs, in input order (`score_logits`)."""
    logits = score_logits(backbone, model, pairs, batch_size, folds, prefetch)
    return np.asarray(1.0 / (1.0 + np.exp(-logits)), dtype=np.float64)
