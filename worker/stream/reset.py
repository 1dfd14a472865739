"""`python -m worker reset`: move a stopped group back (or forward) in the input topic and reprocess.

The worker resumes from the offsets stored in Redis, not from the group's Kafka commits, so Kafka's own
`kafka-consumer-groups --reset-offsets` changes nothing. This tool moves both, to the same place, and
takes back out of the buffer what the range it will consume again stored (`worker.state.reset`), so
that afterwards each event is buffered once, as by a worker that consumed the topic once.

Which events the range stored is read from the topic itself: `[earliest, stored next)` of each partition
is read once; an event of the range is a duplicate when its id came before it (earlier in the range, or
before the new position), a dead letter when it is no event at all (or was too old or new and left no
dedup id), and stored otherwise. The buffer's list ends are checked against that before anything moves.

It refuses while any member of the worker's consumer groups is alive, or a shared run holds its lock:
a running worker would keep writing from where it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import (
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from pydantic import ValidationError

from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.logs import configure_logging
from worker.state import keys
from worker.state.buffer import Buffer
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.state.reset import PartitionReset, PartitionResetter, ResetConflict, SegmentTakeBack
from worker.stream.decode import Rejection, decode, fast_decode
from worker.stream.kafka import make_admin, make_consumer

_READ_TIMEOUT_S = 600.0


class ResetError(RuntimeError):
    """Why the reset cannot go ahead; nothing was changed."""


@dataclass(frozen=True)
class Target:
    """Exactly one of: a time, the earliest offsets, or explicit partition offsets."""

    when: datetime | None = None
    earliest: bool = False
    offsets: dict[int, int] | None = None


def parse_datetime(text: str) -> datetime:
    """ISO 8601; a time without a zone is UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ResetError(
            f"--to-datetime {text!r} is not an ISO 8601 time (e.g. 2024-05-01T12:00:00Z)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_offsets(items: Sequence[str]) -> dict[int, int]:
    out: dict[int, int] = {}
    for item in items:
        p, sep, o = item.partition(":")
        if not sep or not p.strip().isdigit() or not o.strip().isdigit():
            raise ResetError(f"--to-offset {item!r} is not PARTITION:OFFSET (two whole numbers >= 0)")
        if int(p) in out:
            raise ResetError(f"--to-offset names partition {int(p)} twice")
        out[int(p)] = int(o)
    return out


# Where each partition goes


def group_names(settings: Settings) -> list[str]:
    """Every consumer group a worker of this group joins: input, score requests, the shared lease."""
    g = settings.group_id
    return [g, f"{g}-requests", f"{g}-shared-trainer"]


def refuse_if_alive(settings: Settings, admin: AdminClient, buffer: Buffer) -> None:
    """A live member of any of the worker's groups, or a shared run's lock, means a worker runs."""
    futures = admin.describe_consumer_groups(group_names(settings), request_timeout=15)
    for name, future in futures.items():
        desc = future.result()
        idle = desc.state in (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD)
        if desc.members or not idle:
            hosts = sorted({m.host for m in desc.members})
            raise ResetError(
                f"consumer group {name!r} is {desc.state.name.lower()} with {len(desc.members)} live "
                f"member(s) {hosts}: stop every worker of the group first (a reset of a running group "
                "would be undone by its next write)"
            )
    if buffer.redis.exists(keys.shared_lock_key(settings.redis_prefix, settings.input_topic)):
        raise ResetError("a shared run holds its lock in Redis: a worker is training; stop it first")


def resolve(settings: Settings, target: Target) -> dict[int, tuple[int, int, int]]:
    """partition -> (new position, low watermark, high watermark). A position below the low watermark
    is the low watermark (those events are gone); a time past the end is the end."""
    topic = settings.input_topic
    consumer = make_consumer(settings, **{"group.id": f"{settings.group_id}-reset"})
    try:
        meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ResetError(f"topic {topic!r} (WORKER_INPUT_TOPIC) does not exist")
        parts = sorted(meta.partitions)
        if target.offsets is not None:
            unknown = sorted(set(target.offsets) - set(parts))
            if unknown:
                raise ResetError(f"topic {topic!r} has partitions {parts}, not {unknown}")
            parts = sorted(target.offsets)
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15) for p in parts}
        if target.when is not None:
            ms = int(target.when.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in parts], timeout=15)
            wanted = {tp.partition: tp.offset if tp.offset >= 0 else marks[tp.partition][1] for tp in found}
        elif target.earliest:
            wanted = {p: marks[p][0] for p in parts}
        else:
            assert target.offsets is not None
            wanted = dict(target.offsets)
            for p, o in wanted.items():
                if o > marks[p][1]:
                    raise ResetError(f"--to-offset {p}:{o} is past the end of partition {p} ({marks[p][1]})")
    finally:
        consumer.close()
    return {p: (max(wanted[p], marks[p][0]), marks[p][0], marks[p][1]) for p in parts}


# What the replayed range stored


def _event(value: bytes | None, settings: Settings) -> tuple[str, str, int] | None:
    """(segment, event id, clicked) of a well-formed event, whatever its time; None for anything else."""
    if value is None or len(value) > settings.max_message_bytes:
        return None
    fast = fast_decode(value, float("-inf"), float("inf"))
    if fast is not None:
        return fast[0], fast[1], fast[2]
    try:
        event = ClickEvent.model_validate_json(value)
    except ValidationError:
        return None
    return event.segment, event.event_id, event.clicked


def classify(
    plan: PartitionReset,
    messages: Iterable[tuple[int, bytes | None]],
    remembered: set[str],
    settings: Settings,
    now_s: float,
) -> None:
    """Fill `plan` from a partition's messages `[earliest, stored next)` in offset order, as the write
    script counted them: duplicates of earlier ids, dead letters, and the events it stored. `remembered`
    holds which of the range's ids the dedup set holds: a well-formed event that is not there was dead
    (too old or new) when consumed, unless its time is fine now (then its id aged out of dedup)."""
    before: set[str] = set()
    seen: set[str] = set()
    for offset, value in messages:
        ev = _event(value, settings)
        if offset < plan.new_next:
            if ev is not None:
                before.add(ev[1])
            continue
        if ev is None:
            _count_dead(plan, decode(value, settings, now_s))
            continue
        segment, event_id, clicked = ev
        if event_id not in seen and event_id not in before and event_id not in remembered:
            verdict = decode(value, settings, now_s)
            if isinstance(verdict, Rejection):
                _count_dead(plan, verdict)
                continue
        seg = plan.segments.setdefault(segment, SegmentTakeBack())
        if event_id in seen or event_id in before:
            seg.duplicates += 1
        else:
            seen.add(event_id)
            seg.stored.append((event_id, clicked))


def _count_dead(plan: PartitionReset, verdict: ClickEvent | Rejection) -> None:
    code = verdict.code if isinstance(verdict, Rejection) else "schema"
    plan.dead[code] = plan.dead.get(code, 0) + 1


def read_range(
    settings: Settings, ends: dict[int, tuple[int, int]]
) -> dict[int, list[tuple[int, bytes | None]]]:
    """partition -> its messages (offset, value) from `start` up to before `end`, read without a group."""
    topic = settings.input_topic
    out: dict[int, list[tuple[int, bytes | None]]] = {p: [] for p in ends}
    pending = {p for p, (start, end) in ends.items() if start < end}
    if not pending:
        return out
    consumer = make_consumer(
        settings, **{"group.id": f"{settings.group_id}-reset", "enable.partition.eof": True}
    )
    deadline = time.monotonic() + _READ_TIMEOUT_S
    try:
        consumer.assign([TopicPartition(topic, p, ends[p][0]) for p in pending])
        while pending:
            if time.monotonic() > deadline:
                raise ResetError(f"reading partitions {sorted(pending)} took over {_READ_TIMEOUT_S:g} s")
            for msg in consumer.consume(1000, 1.0):
                p: int = msg.partition()  # type: ignore[assignment]
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise ResetError(f"reading partition {p}: {err}")
                    pending.discard(p)
                    continue
                offset: int = msg.offset()  # type: ignore[assignment]
                if offset < ends[p][1]:
                    out[p].append((offset, msg.value()))
                if offset >= ends[p][1] - 1:
                    pending.discard(p)
    finally:
        consumer.close()
    return out


def remembered_ids(buffer: Buffer, partition: int, ids: list[str]) -> set[str]:
    """Which of `ids` the partition's dedup set holds."""
    out: set[str] = set()
    key = buffer.partition_key(partition, "dedup")
    for s in range(0, len(ids), 4000):
        chunk = ids[s : s + 4000]
        scores = buffer.redis.zmscore(key, chunk)  # type: ignore[no-untyped-call]
        out.update(i for i, score in zip(chunk, scores, strict=True) if score is not None)
    return out


def plan_reset(
    settings: Settings, buffer: Buffer, resetter: PartitionResetter, target: Target
) -> list[PartitionReset]:
    """Every partition's move and take-back, checked against the buffer; changes nothing."""
    plans = []
    lows: dict[int, int] = {}
    for p, (new_next, low, high) in resolve(settings, target).items():
        stored, epoch = resetter.position(p)
        if stored is not None and stored > high:
            raise ResetError(
                f"partition {p}: Redis stored offset {stored} is past the topic's end {high} "
                "(was the topic recreated? WORKER_REDIS_PREFIX of another topic?)"
            )
        plans.append(PartitionReset(p, stored, epoch, new_next))
        lows[p] = low
    # From the earliest offset: ids before the new position make the range's copies of them duplicates.
    replayed = [pl for pl in plans if pl.stored_next is not None and pl.new_next < pl.stored_next]
    messages = read_range(
        settings, {pl.partition: (lows[pl.partition], pl.stored_next or 0) for pl in replayed}
    )
    now_s = time.time()
    for plan in replayed:
        msgs = messages[plan.partition]
        ids = [ev[1] for o, v in msgs if o >= plan.new_next and (ev := _event(v, settings)) is not None]
        classify(plan, msgs, remembered_ids(buffer, plan.partition, ids), settings, now_s)
        resetter.check(plan)
    return plans


# Kafka's side and the report


def committed(settings: Settings, admin: AdminClient, partitions: list[int]) -> dict[int, int | None]:
    request = ConsumerGroupTopicPartitions(
        settings.group_id, [TopicPartition(settings.input_topic, p) for p in partitions]
    )
    result = admin.list_consumer_group_offsets([request], request_timeout=15)[settings.group_id].result()
    return {tp.partition: tp.offset if tp.offset >= 0 else None for tp in result.topic_partitions}


def commit(settings: Settings, admin: AdminClient, plans: list[PartitionReset]) -> None:
    """The group's Kafka offsets to the new positions; Kafka refuses while the group has members."""
    request = ConsumerGroupTopicPartitions(
        settings.group_id, [TopicPartition(settings.input_topic, pl.partition, pl.new_next) for pl in plans]
    )
    result = admin.alter_consumer_group_offsets([request], request_timeout=15)[settings.group_id].result()
    failed = [str(tp.error) for tp in result.topic_partitions if tp.error is not None]
    if failed:
        raise ResetError(f"Kafka refused the group's new offsets: {failed[:3]}")


def describe(plans: list[PartitionReset], kafka: dict[int, int | None]) -> Iterator[str]:
    def show(o: int | None) -> str:
        return "none" if o is None else str(o)

    for pl in plans:
        head = (
            f"partition {pl.partition}: stored offset {show(pl.stored_next)} -> {pl.new_next}, "
            f"Kafka group offset {show(kafka.get(pl.partition))} -> {pl.new_next}"
        )
        stored = pl.stored_next or 0
        if pl.new_next > stored:
            yield f"{head}; skips {pl.new_next - stored} messages, clears nothing"
            continue
        segs = sum(1 for s in pl.segments.values() if s.stored)
        yield (
            f"{head}; clears {pl.events} buffered events in {segs} segments, "
            f"{len(pl.dedup_ids)} dedup entries, {pl.duplicates} duplicate and "
            f"{sum(pl.dead.values())} dead-letter counts"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    to = parser.add_mutually_exclusive_group(required=True)
    to.add_argument(
        "--to-datetime", metavar="T", help="per partition, the first offset at or after T (ISO 8601)"
    )
    to.add_argument("--to-earliest", action="store_true", help="the earliest offset Kafka still holds")
    to.add_argument(
        "--to-offset", metavar="P:O", action="append", help="partition P to offset O (repeat per partition)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    parser.add_argument(
        "--models", action="store_true", help="also drop every model, segments' and shared, to zero-shot"
    )


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    try:
        return _run(settings, args)
    except ResetError as exc:
        print(f"error: {exc}; nothing changed", file=sys.stderr)
        return 2
    except ResetConflict as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.to_datetime is not None:
        target = Target(when=parse_datetime(args.to_datetime))
    elif args.to_earliest:
        target = Target(earliest=True)
    else:
        target = Target(offsets=parse_offsets(args.to_offset))
    admin = make_admin(settings)
    buffer = Buffer(settings)
    resetter = PartitionResetter(buffer)
    try:
        refuse_if_alive(settings, admin, buffer)
        plans = plan_reset(settings, buffer, resetter, target)
        kafka = committed(settings, admin, [pl.partition for pl in plans])
    except KafkaException as exc:
        raise ResetError(f"Kafka: {exc}") from None
    for line in describe(plans, kafka):
        print(line)
    registry = Registry.from_settings(settings, buffer.redis)
    models = registry.segments() if args.models else []
    if args.models:
        print(f"models: {len(models)} segments and the shared model back to zero-shot")
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    try:
        refuse_if_alive(settings, admin, buffer)
        commit(settings, admin, plans)
    except KafkaException as exc:
        raise ResetError(f"Kafka: {exc}") from None
    for plan in plans:
        resetter.apply(plan)
    resetter.cap_shared_marks(plans)
    for segment in models:
        registry.forget(segment)
    if args.models:
        registry.shared().forget(SHARED_SEGMENT)
    print("done: the next worker of the group starts from the new offsets")
    return 0
