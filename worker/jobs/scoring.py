"""Scores out: answers to score requests, and the refreshed scores of a segment whose model changed.

Requests are polled on the main thread into a bounded queue (`poll_requests`) and answered on the compute
thread, which owns the models (`answer_next`), before any training; every score is stamped with the
versions that produced it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import numpy as np
import structlog
from confluent_kafka import Consumer, KafkaError, Message
from pydantic import ValidationError

from worker.events import ScoreRequest, ScoreUpdate
from worker.jobs import loaded
from worker.jobs.stats import WorkerStats
from worker.learn.learner import Learner, Serving
from worker.ops.metrics import Metrics
from worker.state.buffer import Buffer
from worker.stream.publish import Publisher

log = structlog.get_logger(__name__)

REQUEST_QUEUE = 256


class Scoring:
    def __init__(
        self,
        *,
        learner: Callable[[], Learner | None],
        buffer: Buffer,
        publisher: Publisher,
        consumer: Consumer,
        requests: queue.Queue[Message],
        metrics: Metrics,
        stats: WorkerStats,
    ) -> None:
        self._learner = learner
        self.buffer = buffer
        self.publisher = publisher
        self.consumer = consumer
        self.requests = requests
        self.metrics = metrics
        self.stats = stats

    def poll_requests(self) -> None:
        """Main thread: move what the request consumer has into the queue, never past its bound."""
        if self.requests.full():
            return
        for msg in self.consumer.consume(min(64, REQUEST_QUEUE - self.requests.qsize()), 0):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.error("request_consume_error", error=str(err))
                continue
            self.requests.put_nowait(msg)

    def answer_next(self) -> bool:
        """Compute thread: answer one queued request; False when none waits."""
        try:
            msg = self.requests.get_nowait()
        except queue.Empty:
            return False
        self.answer(msg)
        return True

    def publish_scores(self, partition: int, segment: str) -> None:
        """Refreshed scores of the segment's candidates, by what serves it now (not flushed here)."""
        learner = loaded(self._learner)
        candidates = self.buffer.candidates(partition, segment)
        if not candidates:
            return
        serving = learner.serving(segment)
        with self.metrics.scoring_duration.labels(kind="refresh").time():
            probs, _ = learner.score(segment, [(c.query, c.item_text) for c in candidates], serving=serving)
        updates = self._updates(segment, [(c.query, c.item_id) for c in candidates], probs, serving)
        published = self.publisher.scores(updates)
        self.stats.scores_published += published
        self.metrics.scores_published.labels(kind="refresh").inc(published)

    def _updates(
        self,
        segment: str,
        items: Sequence[tuple[str | None, str]],
        probs: np.ndarray,
        serving: Serving,
        request_id: str | None = None,
    ) -> list[ScoreUpdate]:
        """Score updates of (query, item id) pairs, stamped with the versions that scored them."""
        now = datetime.now(UTC)
        return [
            ScoreUpdate(
                segment=segment,
                query=query,
                item_id=item_id,
                score=float(p),
                model_version=serving.version,
                shared_version=serving.shared_version,
                served_by=serving.kind,
                scored_at=now,
                request_id=request_id,
            )
            for (query, item_id), p in zip(items, probs, strict=True)
        ]

    def answer(self, msg: Message) -> None:
        """Answer a score request on the scores topic. One that is invalid, or whose scoring raises, goes
        to the dead-letter topic with its reason (`invalid_request`, `scoring_failed`), so the requester
        learns instead of waiting; either way its offset is stored, so a request that always fails is not
        retried forever."""
        try:
            request = ScoreRequest.model_validate_json(msg.value() or b"")
        except ValidationError as exc:
            self.stats.requests_rejected += 1
            self.metrics.score_requests.labels(outcome="rejected").inc()
            log.warning("bad score request", offset=msg.offset(), error=str(exc)[:300])
            self.publisher.dead_letter(msg, "invalid_request", str(exc))
        else:
            try:
                self._score_request(request)
            except Exception as exc:
                self.stats.requests_failed += 1
                self.metrics.score_requests.labels(outcome="failed").inc()
                log.exception(
                    "score request failed",
                    request_id=request.request_id,
                    offset=msg.offset(),
                    partition=msg.partition(),
                )
                self.publisher.dead_letter(msg, "scoring_failed", f"{type(exc).__name__}: {exc}")
        self.consumer.store_offsets(message=msg)

    def _score_request(self, request: ScoreRequest) -> None:
        learner = loaded(self._learner)
        pairs = [(p.query, p.item_text) for p in request.pairs]
        serving = learner.serving(request.segment)
        with self.metrics.scoring_duration.labels(kind="request").time():
            probs, _ = learner.score(request.segment, pairs, serving=serving)
        items = [(p.query, p.item_id) for p in request.pairs]
        self.publisher.scores(self._updates(request.segment, items, probs, serving, request.request_id))
        self.stats.requests_answered += 1
        self.metrics.score_requests.labels(outcome="answered").inc()
        self.metrics.scores_published.labels(kind="request").inc(len(request.pairs))
