"""`models pin`, `unpin` and `list --json` against the real Redis: bad input changes nothing, a pin
refuses promotions and keeps what it names from pruning, `list --json` says what serves each segment."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from registry_helpers import shared_record, version_record

from worker.config import Settings
from worker.events import HoldoutMetrics, ServingChoice
from worker.models import add_arguments, cli_main
from worker.state import keys, pins
from worker.state.buffer import Buffer
from worker.state.keys import segment_hash
from worker.state.registry import SHARED_SEGMENT, Registry, VersionRecord

pytestmark = pytest.mark.integration


@pytest.fixture
def reg(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Registry:
    for key, value in {
        "WORKER_REDIS_URL": settings.redis_url,
        "WORKER_REDIS_PREFIX": settings.redis_prefix,
        "WORKER_MODEL_STORE": str(settings.model_store),
        "WORKER_INPUT_TOPIC": settings.input_topic,
        "WORKER_TOPIC_PARTITIONS": "3",
    }.items():
        monkeypatch.setenv(key, value)
    return Registry.from_settings(settings)


def models(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return cli_main(parser.parse_args(argv))


def _promote(reg: Registry, segment: str, shared_version: int | None = None) -> VersionRecord:
    version = reg.next_version(segment)
    path = reg.adapter_dir(segment, version)
    path.mkdir(parents=True)
    rec = version_record(
        segment,
        version,
        str(path),
        parent_version=reg.champion_version(segment),
        shared_version=shared_version,
        challenger=HoldoutMetrics(auc=0.7, logloss=0.6, n=20),
    )
    return reg.record(rec, gated_against=reg.champion_version(segment))


def _state(reg: Registry, segment: str) -> tuple[Any, ...]:
    """Everything a pin could change."""
    client = reg.client
    return (
        reg.pin(segment),
        client.hgetall(reg.pins_index),
        reg.versions(segment),
        reg.reserved(segment),
        client.get(keys.registry_key(reg.prefix, segment_hash(segment), "moves")),
        pins.changes(client, reg.prefix),
        reg.segments(),
    )


def test_a_pin_that_cannot_hold_exits_non_zero_and_changes_nothing(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = _promote(reg.shared(), SHARED_SEGMENT)
    v1 = _promote(reg, "GE", shared.version)
    rejected = reg.next_version("GE")
    reg.record(version_record("GE", rejected, None, decision="rejected"))
    before = _state(reg, "GE")
    for argv, message in [
        (("pin", "GE", "99"), "has no promoted adapter version 99"),
        (("pin", "GE", str(rejected)), f"has no promoted adapter version {rejected}"),
        (("pin", "GE", "newest"), "unknown pin target 'newest'"),
        (("pin", "Ge", "zero-shot"), "unknown segment 'Ge'"),
        (("unpin", "GE"), "'GE' is not pinned"),
    ]:
        assert models(*argv) == 1, argv
        assert message in capsys.readouterr().err, argv
        assert _state(reg, "GE") == before, argv
    assert models("pin", "GE") == 2 and "pin to what?" in capsys.readouterr().err
    assert models("--shared", "pin", "GE", "1") == 2
    assert _state(reg, "GE") == before

    shutil.rmtree(str(v1.adapter))
    assert models("pin", "GE", str(v1.version)) == 1
    assert "has no directory in the model store" in capsys.readouterr().err
    assert _state(reg, "GE") == before
    assert reg.pin("Ge") is None and "Ge" not in reg.segments()


def test_pin_shared_without_a_shared_model_is_refused(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    _promote(reg, "GE")
    before = _state(reg, "GE")
    for target in ("shared", "blend"):
        assert models("pin", "GE", target) == 1
        assert "no shared model serves yet" in capsys.readouterr().err
        assert _state(reg, "GE") == before


def test_a_pin_refuses_promotions_and_keeps_its_versions_from_pruning(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = reg.shared()
    s1 = _promote(shared, SHARED_SEGMENT)
    v1 = _promote(reg, "GE", s1.version)
    assert models("pin", "GE", "shared", "--reason", "incident 42") == 0
    assert "pinned to shared v1" in capsys.readouterr().out
    pinned = reg.versions("GE")[-1]
    assert pinned.decision == "pinned" and pinned.pinned is not None and pinned.adapter is None
    assert (pinned.pinned.kind, pinned.pinned.shared_version, pinned.pinned.reason) == (
        "shared",
        1,
        "incident 42",
    )
    assert pinned.serving is not None and pinned.serving.reason.startswith("pinned to shared v1")
    box = reg.outboxes(["GE"])[0]
    assert box.rescore and [r.version for r in box.records] == [v1.version, pinned.version]

    challenger = _promote(reg, "GE", s1.version)
    assert challenger.decision == "rejected" and challenger.reason.startswith("pinned:")
    assert challenger.adapter is None and not reg.adapter_dir("GE", challenger.version).exists()
    assert reg.champion_version("GE") == v1.version

    for _ in range(shared.keep + 2):
        _promote(shared, SHARED_SEGMENT)
    assert shared.get(SHARED_SEGMENT, s1.version) is not None and Path(str(s1.adapter)).is_dir()

    assert models("pin", "GE", str(v1.version)) == 0, "a pin replaces a pin"
    assert reg.pin("GE") is not None and reg.pin("GE").kind == "adapter"  # type: ignore[union-attr]
    for _ in range(reg.keep + 2):
        reg.record(version_record("GE", reg.next_version("GE"), None, decision="rejected"))
    assert Path(str(v1.adapter)).is_dir()

    changes = pins.changes(reg.client, reg.prefix)
    assert models("unpin", "GE", "--reason", "fixed") == 0
    unpinned = reg.versions("GE")[-1]
    assert unpinned.decision == "unpinned" and unpinned.pinned is None and "fixed" in unpinned.reason
    assert reg.pin("GE") is None and reg.client.hgetall(reg.pins_index) == {}
    assert pins.changes(reg.client, reg.prefix) == changes + 1
    assert _promote(reg, "GE", s1.version).decision == "promoted", "unpinned, it promotes again"


def test_models_list_json_says_what_serves_each_segment(
    reg: Registry, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = _promote(reg.shared(), SHARED_SEGMENT)
    ge = _promote(reg, "GE", shared.version)
    _promote(reg, "Bosch", shared.version - 1 if shared.version > 1 else 0)
    reg.record(version_record("Bosch", reg.next_version("Bosch"), None, decision="rejected", reason="worse"))
    buffer = Buffer(settings.model_copy(update={"topic_partitions": 3}), reg.client)
    buffer.redis.sadd(buffer.partition_key(2, "segs"), segment_hash("GE"))
    buffer.redis.hset(buffer.segment_key(2, "GE", "meta"), "name", "GE")
    buffer.redis.rpush(buffer.segment_key(2, "GE", "new"), b"a", b"b", b"c")
    assert models("pin", "Bosch", "zero-shot", "--reason", "bad adapter") == 0
    capsys.readouterr()

    assert models("list", "--json") == 0
    rows = {row["segment"]: row for row in orjson.loads(capsys.readouterr().out)}
    assert set(rows) == {"Bosch", "GE"}
    assert rows["GE"]["serves"] == {
        "kind": "adapter",
        "version": ge.version,
        "shared_version": shared.version,
        "text": f"adapter v{ge.version} on shared v{shared.version}",
    }
    assert rows["GE"]["pinned"] is None and rows["GE"]["champion"] == ge.version
    assert rows["GE"]["buffered"] == {"partition": 2, "new": 3, "sample": 0}
    assert rows["GE"]["last_training"]["decision"] == "promoted"
    bosch = rows["Bosch"]
    assert bosch["serves"]["kind"] == "zero_shot" and bosch["serves"]["text"].startswith(
        "pinned to zero-shot"
    )
    assert bosch["pinned"]["reason"] == "bad adapter" and bosch["buffered"] is None
    assert bosch["last_training"]["decision"] == "rejected" and bosch["last_training"]["reason"] == "worse"
    assert [v["decision"] for v in bosch["versions"]] == ["promoted", "rejected", "pinned"]

    assert models("list", "Bosch") == 0
    out = capsys.readouterr().out
    assert (
        out.startswith("Bosch  champion=1  serves=pinned to zero-shot") and "last training=v2 rejected" in out
    )
    assert models("unpin", "Bosch") == 0 and models("list", "Bosch", "--json") == 0
    [row] = orjson.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["serves"]["text"] == "shared v1", "its adapter was gated on another shared version"


def test_models_list_shows_the_verdicts_of_the_shared_promotion(
    reg: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """A segment the shared promotion put on the blend, and one it held back on zero-shot, are listed so."""
    shared = reg.shared()
    version = shared.next_version(SHARED_SEGMENT)
    path = shared.adapter_dir(SHARED_SEGMENT, version)
    path.mkdir(parents=True)
    verdict = {"n": 60, "shared_version": version, "auc": {"zero_shot": 0.6, "blend": 0.65, "shared": 0.62}}
    shared.record(
        shared_record(
            version,
            path,
            serves={"Ryobi": ServingChoice(kind="blend", **verdict)},
            held_back={"GE": ServingChoice(kind="zero_shot", **verdict)},
        ),
        gated_against=None,
    )
    for segment in ("Ryobi", "GE"):
        reg.record(version_record(segment, reg.next_version(segment), None, decision="rejected"))
    assert models("list", "--json") == 0
    rows = {row["segment"]: row["serves"] for row in orjson.loads(capsys.readouterr().out)}
    assert rows["Ryobi"]["kind"] == "blend" and rows["Ryobi"]["shared_version"] == version
    assert rows["Ryobi"]["text"] == f"blend of shared v{version} and zero-shot"
    assert rows["GE"]["kind"] == "zero_shot"
