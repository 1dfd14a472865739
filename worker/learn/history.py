"""What the stream says about a query: how often its results were clicked so far, as head features.

Shoppers type the same queries again, across brands and categories: on the Home Depot stream 87 % of the
evaluation segments' held-out queries also occur in other segments' events. A query whose results are
usually clicked (or usually skipped) says much about a new pair with that query, and a small encoder
trained for a pass or two does not memorise thousands of queries' rates. So the shared model carries a
table of per-query click counts, built at each shared run from the events it was given, and feeds three
numbers per pair to its head (measured in docs/learning.md).

Target leakage is the danger of any such feature: an event's own label must never reach its own
feature, or the model learns to read the label back. Counts are kept per fold (a stable hash of the
event id), and an event known to the table is scored with the counts of the other folds only
(out-of-fold target statistics). A pair that is not an event (a candidate, a score request, a held-out
pair) uses every fold.

No model, no Kafka, no Redis: plain Python and numpy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

FOLDS = 5
SMOOTHING = 5.0
NAMES = ("query_rate", "query_count", "query_seen")
SIZE = len(NAMES)
FILE = "history.json"
_WORD = re.compile(r"[a-z0-9]+")


class Labelled(Protocol):
    @property
    def event_id(self) -> str: ...
    @property
    def query(self) -> str | None: ...
    @property
    def clicked(self) -> int: ...


@functools.lru_cache(maxsize=200_000)
def query_key(query: str | None) -> str:
    """Queries that differ only in case, spacing or punctuation count as one (cached: queries repeat)."""
    return " ".join(_WORD.findall((query or "").lower()))


def fold_of(event_id: str) -> int:
    """The event's fold, stable across runs and processes (independent of the holdout hash)."""
    digest = hashlib.blake2b(event_id.encode(), digest_size=8, person=b"hist-fold").digest()
    return int.from_bytes(digest, "big") % FOLDS


@dataclass(frozen=True, eq=False)
class QueryHistory:
    """Click and event counts per query and fold (`counts[index[key]]`, shape `(FOLDS, 2)`), and the same
    for the whole table (`totals`). Immutable: models that share a table never copy it."""

    index: dict[str, int]
    counts: np.ndarray
    totals: np.ndarray

    @classmethod
    def from_events(cls, events: Iterable[Labelled]) -> QueryHistory:
        index: dict[str, int] = {}
        rows: list[int] = []
        folds: list[int] = []
        clicks: list[int] = []
        for e in events:
            key = query_key(e.query)
            if key:
                rows.append(index.setdefault(key, len(index)))
                folds.append(fold_of(e.event_id))
                clicks.append(int(e.clicked))
        counts = np.zeros((len(index), FOLDS, 2), dtype=np.int64)
        np.add.at(counts, (rows, folds, 0), clicks)
        np.add.at(counts, (rows, folds, 1), 1)
        return cls._frozen(index, counts)

    @classmethod
    def _frozen(cls, index: dict[str, int], counts: np.ndarray) -> QueryHistory:
        totals = counts.sum(0)
        counts.setflags(write=False)
        totals.setflags(write=False)
        return cls(index, counts, totals)

    def __deepcopy__(self, memo: dict[int, Any]) -> QueryHistory:
        return self

    @property
    def clicks(self) -> int:
        return int(self.totals[:, 0].sum())

    @property
    def events(self) -> int:
        return int(self.totals[:, 1].sum())

    def features(
        self, queries: Sequence[str | None], folds: Sequence[int | None] | None = None
    ) -> np.ndarray:
        """`SIZE` numbers per query, in the order of `NAMES`: the smoothed log-odds of its click rate
        relative to the table's rate, log count, seen; zeros for an unseen or empty query. `folds[i]`
        (an event's `fold_of`) leaves that fold's counts out, of the query and of the table's rate."""
        out = np.zeros((len(queries), SIZE), dtype=np.float32)
        rows = np.array([self.index.get(query_key(q), -1) for q in queries], dtype=np.int64)
        fold = np.full(len(queries), -1, dtype=np.int64)
        if folds is not None:
            fold[:] = [-1 if f is None else f for f in folds]
        known = np.flatnonzero(rows >= 0)
        if len(known) == 0:
            return out
        left_out = fold[known]
        own = np.zeros((len(known), 2), dtype=np.int64)
        own_total = np.zeros((len(known), 2), dtype=np.int64)
        has = left_out >= 0
        own[has] = self.counts[rows[known][has], left_out[has]]
        own_total[has] = self.totals[left_out[has]]
        clicks, n = (self.counts[rows[known]].sum(1) - own).T
        all_clicks, all_events = (self.totals.sum(0) - own_total).T
        base = (all_clicks + 1.0) / (all_events + 2.0)
        rate = (clicks + SMOOTHING * base) / (n + SMOOTHING)
        values = np.stack(
            [np.log(rate / (1 - rate)) - np.log(base / (1 - base)), np.log1p(n) / 4.0, np.ones(len(n))], 1
        )
        out[known] = np.where((n > 0)[:, None], values, 0.0)
        return out

    def save(self, directory: Path) -> Path:
        """JSON only (nothing executable): the keys and each query's counts as `[clicks, events]` per fold."""
        keys = sorted(self.index, key=self.index.__getitem__)
        doc = {"folds": FOLDS, "keys": keys, "counts": self.counts.reshape(len(keys), -1).tolist()}
        path = Path(directory) / FILE
        path.write_text(json.dumps(doc, separators=(",", ":")))
        return path

    @classmethod
    def load(cls, directory: Path) -> QueryHistory | None:
        """The table saved in `directory`, or None when the model was saved without one."""
        path = Path(directory) / FILE
        if not path.exists():
            return None
        doc = json.loads(path.read_text())
        if doc.get("folds") != FOLDS:
            raise ValueError(f"{path}: {doc.get('folds')} folds, this version reads {FOLDS}")
        keys = [str(k) for k in doc["keys"]]
        counts = np.asarray(doc["counts"], dtype=np.int64).reshape(len(keys), FOLDS, 2)
        return cls._frozen({k: i for i, k in enumerate(keys)}, counts)
