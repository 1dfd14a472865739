"""Scoring through Kafka, as a client of the workers would: score requests out on `score-requests`, the
answers read back from `scores`, with the model versions that answered."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from worker.config import Settings
from worker.events import ClickEvent, ScorePair, ScoreRequest
from worker.stream.kafka import client_config, make_producer
from worker.tools.evaluation.live_fleet import LiveEvalError
from worker.tools.replay import produce_when_room

REQUEST_PAIRS = 1000
"""Held-out pairs per score request (a request takes at most 10,000)."""


@dataclass(frozen=True)
class Answer:
    """A segment's scores at one checkpoint, and the adapter and shared versions that gave them."""

    probs: np.ndarray
    versions: set[int]
    shared: set[int] = field(default_factory=set)


class Scorer:
    """Sends score requests and reads their answers from the scores topic, every partition assigned from
    its beginning. Assigned, not subscribed: a checkpoint may wait longer than `max.poll.interval.ms` for
    the workers' trainings, and a subscribed reader would be put out of its group meanwhile and read the
    topic again from the beginning when it rejoins."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id
        self.producer: Producer = make_producer(settings)
        self.consumer = Consumer(
            {
                **client_config(settings),
                "group.id": f"{run_id}-eval-reader",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        topic = settings.scores_topic
        partitions = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._answers: dict[str, list[tuple[float, int, int]]] = {}

    def score(
        self,
        tag: str,
        pairs: Mapping[str, Sequence[ClickEvent]],
        timeout_s: float,
        check: Callable[[], None],
    ) -> dict[str, Answer]:
        """Scores of every segment's pairs, as the workers answer them."""
        wanted: dict[str, tuple[str, int]] = {}
        for index, (segment, events) in enumerate(pairs.items()):
            for chunk, start in enumerate(range(0, len(events), REQUEST_PAIRS)):
                part = events[start : start + REQUEST_PAIRS]
                request_id = f"{self.run_id}-{tag}-s{index}-c{chunk}"
                request = ScoreRequest(
                    request_id=request_id,
                    segment=segment,
                    pairs=[ScorePair(query=e.query, item_id=e.item_id, item_text=e.item_text) for e in part],
                )
                produce_when_room(
                    self.producer,
                    self.settings.requests_topic,
                    segment.encode("utf-8", "surrogatepass"),
                    request.to_json(),
                )
                wanted[request_id] = (segment, len(part))
        if self.producer.flush(30) > 0:
            raise LiveEvalError("score requests not acknowledged by the broker within 30 s")
        deadline = time.monotonic() + timeout_s
        while any(len(self._answers.get(r, ())) < n for r, (_, n) in wanted.items()):
            if time.monotonic() > deadline:
                missing = sum(n - len(self._answers.get(r, ())) for r, (_, n) in wanted.items())
                raise LiveEvalError(
                    f"{missing} scores of checkpoint {tag} not answered within {timeout_s:.0f} s"
                )
            check()
            self._read()
        out: dict[str, Answer] = {}
        for request_id, (segment, n) in wanted.items():
            got = self._answers.pop(request_id)[:n]
            prev = out.get(segment)
            probs = np.asarray([p for p, _, _ in got], dtype=np.float64)
            versions = {v for _, v, _ in got}
            shared = {v for _, _, v in got}
            out[segment] = (
                Answer(probs, versions, shared)
                if prev is None
                else Answer(
                    np.concatenate([prev.probs, probs]), prev.versions | versions, prev.shared | shared
                )
            )
        return out

    def _read(self) -> None:
        for msg in self.consumer.consume(1000, 0.5):
            value = msg.value()
            if msg.error() is not None or value is None:
                continue
            update = orjson.loads(value)
            request_id = update.get("request_id")
            if request_id:
                self._answers.setdefault(request_id, []).append(
                    (
                        float(update["score"]),
                        int(update["model_version"]),
                        int(update.get("shared_version") or 0),
                    )
                )

    def close(self) -> None:
        self.consumer.close()
