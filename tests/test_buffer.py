"""The Redis buffer against a real Redis: caps, sequence ranges, dedup, offsets and key layout."""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson
import pytest
from ingest_helpers import event_doc

from worker.config import Settings
from worker.events import ClickEvent
from worker.state import keys
from worker.state.buffer import Buffer, PartitionWrite, Pending
from worker.state.entry import decode_entry, encode_entry, pair_key
from worker.state.keys import segment_hash

pytestmark = pytest.mark.integration


@pytest.fixture
def buffer(settings: Settings) -> Iterator[Buffer]:
    b = Buffer(settings.model_copy(update={"new_events_cap": 8, "sample_cap": 16, "candidates_cap": 3}))
    yield b
    b.purge()


def pending(
    offset: int, segment: str = "s", clicked: int | None = None, event_id: str | None = None
) -> Pending:
    doc = event_doc(offset, segment, clicked)
    if event_id is not None:
        doc["event_id"] = event_id
    return Pending(
        offset,
        segment,
        doc["event_id"],
        doc["clicked"],
        pair_key(doc["query"], doc["item_id"]),
        orjson.dumps(doc),
    )


def write(
    buffer: Buffer, events: list[Pending], partition: int = 0, dead: list[tuple[int, str]] | None = None
) -> None:
    offsets = [e.offset for e in events] + [o for o, _ in dead or []]
    buffer.write([PartitionWrite(buffer.topic, partition, max(offsets) + 1, events, dead or [])])


def test_cap_drops_the_oldest_and_counts_them(buffer: Buffer) -> None:
    write(buffer, [pending(i, clicked=1 if i < 5 else 0) for i in range(12)])
    c = buffer.counts(0, "s")
    assert (c.events, c.new, c.dropped, c.seq) == (12, 8, 4, 12)
    snap = buffer.training_snapshot(0, "s")
    assert [e.event_id for e in snap.new_events] == [f"e-{i}" for i in range(4, 12)]
    assert (snap.seq_from, snap.seq_to) == (5, 12)
    assert (c.new_positives, c.new_negatives) == (1, 7)
    assert (c.positives, c.negatives) == (5, 7)


def test_sample_keeps_the_last_events_and_excludes_new_ones(buffer: Buffer) -> None:
    write(buffer, [pending(i) for i in range(20)])
    snap = buffer.training_snapshot(0, "s")
    assert buffer.counts(0, "s").sample == 16
    assert [e.event_id for e in snap.sample_events] == [f"e-{i}" for i in range(4, 12)]
    assert all(isinstance(e, ClickEvent) for e in snap.new_events + snap.sample_events)


def test_mark_trained_keeps_events_that_arrived_during_training(buffer: Buffer) -> None:
    write(buffer, [pending(i, clicked=1) for i in range(5)])
    snap = buffer.training_snapshot(0, "s")
    write(buffer, [pending(i, clicked=0) for i in range(5, 8)])
    assert buffer.mark_trained(0, "s", snap.seq_to, now_ms=1234) == 5
    c = buffer.counts(0, "s")
    assert (c.new, c.new_positives, c.new_negatives, c.trained_seq, c.last_trained_ms) == (3, 0, 3, 5, 1234)
    assert [e.event_id for e in buffer.training_snapshot(0, "s").new_events] == ["e-5", "e-6", "e-7"]
    assert buffer.mark_trained(0, "s", snap.seq_to) == 0


def test_duplicate_event_id_is_dropped_and_counted_first_wins(buffer: Buffer) -> None:
    first = pending(0, clicked=1, event_id="same")
    second = pending(1, clicked=0, event_id="same")
    write(buffer, [first, second, pending(2)])
    write(buffer, [pending(3, event_id="same")])
    c = buffer.counts(0, "s")
    assert (c.events, c.duplicates, c.positives) == (2, 2, 1)
    assert buffer.partition_stats(0)["duplicates"] == 2
    assert buffer.training_snapshot(0, "s").new_events[0].clicked == 1


def test_offsets_are_stored_with_events_and_stale_batches_change_nothing(buffer: Buffer) -> None:
    write(buffer, [pending(0), pending(1)], dead=[(2, "invalid_json")])
    assert buffer.stored_offset(0) == 3
    write(
        buffer, [pending(1, event_id="replayed-late"), pending(2, event_id="also-late")], dead=[(0, "schema")]
    )
    assert buffer.stored_offset(0) == 3
    stats = buffer.partition_stats(0)
    assert (stats["events"], stats["stale"], stats["dlq"], stats["dlq.invalid_json"]) == (2, 3, 1, 1)
    assert buffer.stored_offset(1) is None


def test_candidates_are_distinct_recent_pairs_bounded_by_cap(buffer: Buffer) -> None:
    events = []
    for i in range(6):
        doc = event_doc(i, "s", query=f"q{i % 4}", item_id=f"it{i % 4}", item_text=f"text {i}")
        events.append(
            Pending(i, "s", doc["event_id"], 1, pair_key(doc["query"], doc["item_id"]), orjson.dumps(doc))
        )
    write(buffer, events)
    cands = buffer.candidates(0, "s")
    assert [(c.query, c.item_id, c.item_text) for c in cands] == [
        ("q1", "it1", "text 5"),
        ("q0", "it0", "text 4"),
        ("q3", "it3", "text 3"),
    ]


def test_segments_and_states(buffer: Buffer) -> None:
    write(buffer, [pending(0, "b"), pending(1, "a"), pending(2, "b")], partition=2)
    assert buffer.segments(2) == ["a", "b"]
    states = {s.segment: s for s in buffer.segment_states(2)}
    assert (states["b"].seq, states["b"].new) == (2, 2)


def test_keys_share_the_partition_hash_tag_and_never_contain_the_name(buffer: Buffer) -> None:
    name = "evil:*{x}\n" + "z" * 100
    write(buffer, [pending(0, name)], partition=4)
    keys = [k.decode() for k in buffer.redis.scan_iter(match=f"{buffer.prefix}:*")]
    assert keys and all(k.startswith(f"{buffer.prefix}:{{{buffer.topic}-4}}:") for k in keys)
    assert all(re.fullmatch(r"[A-Za-z0-9_.{}:-]+", k) for k in keys)
    assert any(segment_hash(name) in k for k in keys)
    assert buffer.segments(4) == [name]


def test_key_strings_are_the_stored_layout() -> None:
    """Stored data is found by these exact strings: a change here must come with a migration."""
    h = segment_hash("s")
    tag = keys.partition_tag("w", "clicks", 3)
    assert tag == "w:{clicks-3}"
    assert [keys.partition_key(tag, p) for p in ("offsets", "dedup", "stats", "segs", "active")] == [
        "w:{clicks-3}:offsets",
        "w:{clicks-3}:dedup",
        "w:{clicks-3}:stats",
        "w:{clicks-3}:segs",
        "w:{clicks-3}:active",
    ]
    assert keys.segment_key_base(tag, h) == f"w:{{clicks-3}}:seg:{h}:"
    assert [keys.segment_key(tag, h, p) for p in ("meta", "new", "sample", "cand", "candz")] == [
        f"w:{{clicks-3}}:seg:{h}:{p}" for p in ("meta", "new", "sample", "cand", "candz")
    ]
    assert keys.registry_key("w", h, "champion") == f"w:reg:{{{h}}}:champion"
    assert keys.registry_index_key(keys.shared_registry_prefix("w")) == "w:shared:reg:index"
    assert keys.prefix_pattern("w") == "w:*"


def test_entries_are_a_label_byte_and_the_json_as_sent() -> None:
    assert encode_entry(1, b'{"a":1}') == b'1{"a":1}'
    assert encode_entry(0, b'{"a":1}') == b'0{"a":1}'
    assert decode_entry(b'1{"a":1}') == (1, b'{"a":1}')
    assert decode_entry(b"0{}") == (0, b"{}")
    with pytest.raises(ValueError, match="label"):
        decode_entry(b"2{}")
    assert pair_key(None, "i") != pair_key("", "i")


def test_the_write_script_writes_exactly_the_keys_of_the_layout(buffer: Buffer) -> None:
    """The script gets its keys from Python (`worker.state.keys`) and writes those, no others."""
    write(buffer, [pending(0, "x")], partition=1)
    tag = keys.partition_tag(buffer.prefix, buffer.topic, 1)
    stored = {k.decode() for k in buffer.redis.scan_iter(match=keys.prefix_pattern(buffer.prefix))}
    h = segment_hash("x")
    assert stored == {
        *(keys.partition_key(tag, p) for p in ("offsets", "dedup", "stats", "segs", "active")),
        *(keys.segment_key(tag, h, p) for p in ("meta", "new", "sample", "cand", "candz")),
    }


def test_a_script_redis_lost_is_loaded_again_and_applied_once(buffer: Buffer) -> None:
    """Building a buffer asks Redis nothing; a write that finds its script gone (a restart, SCRIPT FLUSH)
    loads it and runs again, and the offsets already stored keep the batch from counting twice."""
    write(buffer, [pending(0, clicked=1)])
    buffer.redis.script_flush()
    write(buffer, [pending(1, clicked=0), pending(2, clicked=1)])
    write(buffer, [pending(1, clicked=0), pending(2, clicked=1)])
    c = buffer.counts(0, "s")
    assert (c.events, c.positives, c.negatives) == (3, 2, 1)
    assert buffer.stored_offsets([0])[0] == 3
