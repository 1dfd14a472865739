"""How good a model's click probabilities are: ROC AUC, log loss, the paired differences (with their
standard errors) the training gate reads, and the prequential window `/metrics` reads.

One implementation of each number, so the gate that promotes a model and the dashboard that watches it
can never disagree on what "AUC 0.73" means. Plain numpy: no model, no Prometheus, no scikit-learn.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

EPS = 1e-7
"""Probabilities are clipped to [EPS, 1 - EPS] for log loss, so one confident miss cannot give infinity."""

OTHER = "__other__"
"""Segment name of the pooled window past the cardinality cap (a name no real segment is likely to use)."""

Numbers = Sequence[float] | Sequence[int] | np.ndarray


def _midranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    # A run of equal scores at 0-based positions start..end-1 shares the mean of 1-based ranks start+1..end.
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc(labels: Numbers, scores: Numbers) -> float | None:
    """ROC AUC by the Mann-Whitney rank sum, ties given their average rank (what scikit-learn computes).

    None when the labels hold one class only: AUC is undefined there, and a made-up 0.5 would read as
    a real (bad) number on a dashboard or in the gate.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return None
    ranks = _midranks(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


@dataclass(frozen=True)
class Difference:
    """`a - b` of one metric on the same pairs, with its standard error (infinite: too few pairs to
    know). `lower(z)` / `upper(z)` are the one-sided bounds the gate reads."""

    delta: float
    se: float
    n: int

    def lower(self, z: float) -> float:
        return self.delta - z * self.se

    def upper(self, z: float) -> float:
        return self.delta + z * self.se

    def __str__(self) -> str:
        se = "inf" if not np.isfinite(self.se) else f"{self.se:.4f}"
        return f"{self.delta:+.4f} ± {se} (n={self.n})"


def auc_difference(labels: Numbers, a: Numbers, b: Numbers) -> Difference | None:
    """AUC(a) - AUC(b) of two models scored on the same pairs, with DeLong's standard error for
    correlated ROC curves (DeLong, DeLong & Clarke-Pearson 1988; the midrank form of Sun & Xu 2014).

    Paired, so two models that rank alike have a small error even on a small holdout, and a
    deterministic closed form: the gate gives the same verdict on the same pairs every time.
    None when the labels hold one class only.
    """
    y = np.asarray(labels, dtype=np.int64)
    x = np.stack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    pos_mask = y == 1
    m, n = int(pos_mask.sum()), int(len(y) - pos_mask.sum())
    if m == 0 or n == 0:
        return None
    v10 = np.empty((2, m))
    v01 = np.empty((2, n))
    aucs = np.empty(2)
    for k in range(2):
        pos, neg = x[k, pos_mask], x[k, ~pos_mask]
        tz = _midranks(np.concatenate([pos, neg]))
        tx, ty = _midranks(pos), _midranks(neg)
        aucs[k] = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v10[k] = (tz[:m] - tx) / n
        v01[k] = 1.0 - (tz[m:] - ty) / m
    if m < 2 or n < 2:
        return Difference(float(aucs[0] - aucs[1]), float("inf"), len(y))
    s10, s01 = np.cov(v10), np.cov(v01)
    contrast = np.array([1.0, -1.0])
    var = float(contrast @ s10 @ contrast / m + contrast @ s01 @ contrast / n)
    return Difference(float(aucs[0] - aucs[1]), float(np.sqrt(max(var, 0.0))), len(y))


def logloss_gain(labels: Numbers, a: Numbers, b: Numbers) -> Difference | None:
    """How much lower model a's log loss is than b's on the same pairs (positive: a is better), with
    the standard error of the mean of the per-pair differences. None for fewer than two pairs."""
    y = np.asarray(labels, dtype=np.float64)
    if len(y) < 2:
        return None
    pa = np.clip(np.asarray(a, dtype=np.float64), EPS, 1 - EPS)
    pb = np.clip(np.asarray(b, dtype=np.float64), EPS, 1 - EPS)

    d = y * (np.log(pa) - np.log(pb)) + (1 - y) * (np.log(1 - pa) - np.log(1 - pb))
    return Difference(float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))), len(d))


def log_loss(labels: Numbers, scores: Numbers) -> float | None:
    """Mean binary cross-entropy of probabilities clipped by `EPS`; None for no pairs."""
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0:
        return None
    p = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass(frozen=True)
class HoldoutScore:
    """A model's AUC (None: one class only) and log loss on `n` holdout pairs. Log loss is NaN for no
    pairs and infinite for non-finite probabilities, so the gate can refuse both without a special case."""

    auc: float | None
    logloss: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def holdout_score(labels: Numbers, scores: Numbers) -> HoldoutScore:
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(scores, dtype=np.float64)
    if len(y) == 0:
        return HoldoutScore(None, float("nan"), 0)
    if not np.all(np.isfinite(p)):
        return HoldoutScore(None, float("inf"), len(y))
    loss = log_loss(y, p)
    assert loss is not None
    return HoldoutScore(auc(y, p), loss, len(y))


class _Window:
    __slots__ = ("ids", "labels", "scores")

    def __init__(self, size: int) -> None:
        self.scores: deque[float] = deque(maxlen=size)
        self.labels: deque[int] = deque(maxlen=size)
        self.ids: deque[str | None] = deque(maxlen=size)

    def add(self, score: float, label: int, event_id: str | None) -> None:
        self.scores.append(score)
        self.labels.append(label)
        self.ids.append(event_id)


class Prequential:
    """Per segment, the last `window` (score, label) pairs scored before learning; AUC and log loss.

    Prequential: each event is scored before any model learns from it, so the numbers say how the model
    does on traffic it has not seen, with no holdout spent. Thread-safe (the compute thread records,
    a scrape reads).

    Label cardinality is bounded: only the `max_segments` busiest segments (by events recorded) get their
    own window; all others share one pooled window under `OTHER`. A quieter segment is replaced only
    when another has strictly more traffic, so labels do not flap between equals. Memory is
    (max_segments + 1) windows plus one integer per segment seen (capped at `max_tracked`).
    """

    def __init__(self, window: int = 500, max_segments: int = 50, max_tracked: int = 100_000) -> None:
        if window < 2 or max_segments < 1:
            raise ValueError("window must be >= 2 and max_segments >= 1")
        self.window = window
        self.max_segments = max_segments
        self.max_tracked = max_tracked
        self._lock = threading.Lock()
        self._traffic: dict[str, int] = {}
        self._windows: dict[str, _Window] = {}
        self._other = _Window(window)

    def record(
        self,
        segment: str,
        scores: Numbers,
        labels: Numbers,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Add pairs scored before any model learned from them; returns how many were new.

        With `event_ids`, an id already in the segment's window is skipped: the shared run and the
        segment run may both score the same new events first, and each must count once.
        """
        if len(scores) != len(labels) or (event_ids is not None and len(event_ids) != len(labels)):
            raise ValueError("scores, labels and event_ids must have the same length")
        with self._lock:
            self._traffic[segment] = self._traffic.get(segment, 0) + len(labels)
            if len(self._traffic) > self.max_tracked:
                self._prune_traffic()
            win = self._admit(segment)
            seen = set(win.ids) if event_ids is not None else set()
            added = 0
            for i, (score, label) in enumerate(zip(scores, labels, strict=True)):
                eid = event_ids[i] if event_ids is not None else None
                if eid is not None and eid in seen:
                    continue
                if eid is not None:
                    seen.add(eid)
                win.add(float(score), int(label), eid)
                added += 1
            return added

    def _admit(self, segment: str) -> _Window:
        win = self._windows.get(segment)
        if win is not None:
            return win
        if len(self._windows) < self.max_segments:
            win = self._windows[segment] = _Window(self.window)
            return win
        quietest = min(self._windows, key=lambda s: self._traffic.get(s, 0))
        if self._traffic[segment] > self._traffic.get(quietest, 0):
            del self._windows[quietest]
            win = self._windows[segment] = _Window(self.window)
            return win
        return self._other

    def _prune_traffic(self) -> None:
        keep = sorted(self._traffic.items(), key=lambda kv: kv[1], reverse=True)[: self.max_tracked // 2]
        self._traffic = dict(keep)
        for s in self._windows:
            self._traffic.setdefault(s, 0)

    def forget(self, segment: str) -> None:
        """An expired segment gives up its window and its label, so a busier one can take them."""
        with self._lock:
            self._windows.pop(segment, None)
            self._traffic.pop(segment, None)

    def labelled_segments(self) -> list[str]:
        """Segments with a window of their own right now (at most `max_segments`), plus `OTHER` when used."""
        with self._lock:
            names = sorted(self._windows)
            return [*names, OTHER] if self._other.labels else names

    def snapshot(self) -> dict[str, tuple[float | None, float | None, int]]:
        """segment -> (AUC or None, log loss or None, pairs in window), for every window in use."""
        with self._lock:
            wins = [(s, list(w.scores), list(w.labels)) for s, w in self._windows.items()]
            if self._other.labels:
                wins.append((OTHER, list(self._other.scores), list(self._other.labels)))
        return {s: (auc(lb, sc), log_loss(lb, sc), len(lb)) for s, sc, lb in wins}
