"""The registry against the real Redis: versions, champion pointer, rollback, pruning, CLI."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis
from registry_helpers import version_record

from worker.config import Settings
from worker.events import HoldoutMetrics, ServingChoice
from worker.models import add_arguments, cli_main
from worker.state.registry import (
    SHARED_SEGMENT,
    Registry,
    RegistryError,
    VersionRecord,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def reg(settings: Settings) -> Registry:
    return Registry.from_settings(settings)


def _record(reg: Registry, segment: str, decision: str = "promoted", auc: float = 0.7) -> VersionRecord:
    version = reg.next_version(segment)
    adapter = None
    if decision == "promoted":
        path = reg.adapter_dir(segment, version)
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"x")
        adapter = str(path)
    rec = version_record(
        segment,
        version,
        adapter,
        parent_version=reg.champion_version(segment),
        decision=decision,
        events_to=10,
        challenger=HoldoutMetrics(auc=auc, logloss=0.6, n=20),
        train_seconds=0.1,
    )
    return reg.record(rec, gated_against=reg.champion_version(segment))


def test_versions_are_unique_and_increasing_under_concurrency(reg: Registry) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(50):
            v = reg.next_version("GE")
            with lock:
                got.append(v)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 201))


def test_versions_survive_a_new_registry_instance(reg: Registry, settings: Settings) -> None:
    first = reg.next_version("GE")
    again = Registry.from_settings(settings, redis.Redis.from_url(settings.redis_url))
    assert again.next_version("GE") == first + 1


def test_reserved_counts_the_numbers_handed_out_for_each_segment(reg: Registry, settings: Settings) -> None:
    """What a shared run's seed is taken from: it survives a new instance and ignores other segments."""
    assert reg.reserved("a") == 0
    reg.next_version("a")
    reg.next_version("a")
    reg.next_version("b")
    assert reg.reserved("a") == 2
    assert Registry.from_settings(settings).reserved("a") == 2
    assert reg.reserved("b") == 1 and reg.reserved("c") == 0


def test_two_concurrent_trainers_never_move_the_champion_back(reg: Registry) -> None:
    """Trainer B reserves a later version but finishes first; A's older promotion must not win."""
    a = reg.next_version("KOHLER")
    b = reg.next_version("KOHLER")
    for version in (b, a):
        path = reg.adapter_dir("KOHLER", version)
        path.mkdir(parents=True)
        stored = reg.record(version_record("KOHLER", version, str(path)))
        assert stored.decision == ("promoted" if version == b else "rejected")
    assert reg.champion_version("KOHLER") == b


def test_promotion_is_fenced_on_the_champion_it_was_gated_against(reg: Registry) -> None:
    """Two challengers gated against the same champion: the first to record wins; the second was never
    compared with the new champion, so it is stored as rejected (with the reason, without its adapter)
    whatever its version number, and a lost race is never announced as a promotion."""
    first = _record(reg, "MOEN")
    late_start, early_finish = reg.next_version("MOEN"), reg.next_version("MOEN")
    paths = {}
    for version in (late_start, early_finish):
        paths[version] = reg.adapter_dir("MOEN", version)
        paths[version].mkdir(parents=True)
    won = reg.record(version_record("MOEN", early_finish, str(paths[early_finish])), first.version)
    lost = reg.record(version_record("MOEN", late_start, str(paths[late_start])), first.version)
    assert won.decision == "promoted" and reg.champion_version("MOEN") == early_finish
    assert lost.decision == "rejected" and lost.adapter is None and "lost the race" in lost.reason
    assert f"v{first.version} to v{early_finish}" in lost.reason
    assert reg.get("MOEN", late_start) == lost and not paths[late_start].exists()
    newer = reg.next_version("MOEN")
    paths[newer] = reg.adapter_dir("MOEN", newer)
    paths[newer].mkdir(parents=True)
    assert reg.record(version_record("MOEN", newer, str(paths[newer])), first.version).decision == "rejected"
    assert reg.record(
        version_record("MOEN", reg.next_version("MOEN"), None, decision="rejected")
    ).decision == ("rejected")
    assert reg.champion_version("MOEN") == early_finish


def test_rejected_versions_are_recorded_but_not_champion(reg: Registry) -> None:
    good = _record(reg, "Delta")
    bad = _record(reg, "Delta", decision="rejected")
    assert reg.champion_version("Delta") == good.version
    assert reg.get("Delta", bad.version) == bad
    assert [r.decision for r in reg.versions("Delta")] == ["promoted", "rejected"]


def test_promotion_needs_a_complete_adapter_dir(reg: Registry) -> None:
    version = reg.next_version("GE")
    with pytest.raises(RegistryError, match="adapter"):
        reg.record(version_record("GE", version, str(reg.adapter_dir("GE", version))))
    assert reg.champion_version("GE") is None


def test_rollback(reg: Registry) -> None:
    v1 = _record(reg, "Ryobi").version
    v2 = _record(reg, "Ryobi").version
    assert reg.champion_version("Ryobi") == v2
    assert reg.rollback("Ryobi").version == v1
    assert reg.champion_version("Ryobi") == v1
    assert reg.rollback("Ryobi", v2).version == v2
    with pytest.raises(RegistryError):
        reg.rollback("Ryobi", 99)
    v3 = _record(reg, "Ryobi").version
    assert reg.champion_version("Ryobi") == v3


def test_rollback_is_fenced_on_the_champion_the_operator_saw(reg: Registry) -> None:
    """An operator saw v2 serving and rolls back; v3 was promoted meanwhile: nothing moves, since the
    rollback would undo a promotion nobody looked at (like a promotion gated on an old champion)."""
    v1 = _record(reg, "Ryobi").version
    v2 = _record(reg, "Ryobi").version
    v3 = _record(reg, "Ryobi").version
    with pytest.raises(RegistryError, match=f"v{v3}, not v{v2}"):
        reg.rollback("Ryobi", v1, expected=v2)
    assert reg.champion_version("Ryobi") == v3
    assert reg.rollback("Ryobi", v1, expected=v3).version == v1
    assert reg.champion_version("Ryobi") == v1


def test_versions_stay_above_the_store_after_redis_lost_its_data(reg: Registry, settings: Settings) -> None:
    """Redis comes back empty: the next number is above every version directory on disk, so no adapter
    is overwritten and no (segment, version) is announced twice for different models."""
    for _ in range(3):
        _record(reg, "GE")
    _record(reg, "GE", decision="rejected")
    reg.adapter_dir("GE", 6).parent.joinpath(".00000006.tmp-host-1-" + "0" * 32).mkdir()
    client = redis.Redis.from_url(settings.redis_url)
    for key in client.scan_iter(match=f"{settings.redis_prefix}:*"):
        client.delete(key)
    assert reg.champion_version("GE") is None and reg.reserved("GE") == 0
    got = [reg.next_version("GE") for _ in range(2)]
    assert got == [7, 8], "above v3 on disk and v6 being written; v4 was never on disk"
    assert reg.next_version("other") == 1


def test_the_outbox_holds_every_decision_and_champion_move_until_published(reg: Registry) -> None:
    """What the worker publishes, and republishes after a crash: every version above the published
    pointer, and a rescore whenever the champion moved (promotion or rollback) since the last one."""
    v1 = _record(reg, "GE").version
    v2 = _record(reg, "GE", decision="rejected").version
    _record(reg, "Delta")
    [ge, _] = reg.outboxes(["GE", "Delta", "none"])
    assert [r.version for r in ge.records] == [v1, v2] and ge.rescore and ge.moves == 1
    reg.mark_published(ge)
    assert [o.segment for o in reg.outboxes(["GE", "Delta"])] == ["Delta"]
    v3 = _record(reg, "GE").version
    reg.mark_published(ge)
    [again] = reg.outboxes(["GE"])
    assert [r.version for r in again.records] == [v3] and again.rescore, "a late mark never goes back"
    reg.mark_published(again)
    assert reg.outboxes(["GE"]) == []
    reg.rollback("GE")
    [rolled] = reg.outboxes(["GE"])
    assert rolled.records == [] and rolled.rescore, "a rollback republishes the segment's scores"
    reg.mark_published(rolled)
    assert reg.outboxes(["GE"]) == []


def test_prune_keeps_the_last_n_promoted_versions_however_many_were_rejected(settings: Settings) -> None:
    reg = Registry.from_settings(settings.model_copy(update={"keep_versions": 2}))
    first = _record(reg, "GE", auc=0.9)
    second = _record(reg, "GE", auc=0.91)
    others = [_record(reg, "GE", decision="rejected") for _ in range(6)]
    kept = [r.version for r in reg.versions("GE")]
    assert kept == [first.version, second.version, *[r.version for r in others[-2:]]]
    assert Path(first.adapter or "").is_dir(), "the rollback target survives six rejections"
    assert reg.rollback("GE").version == first.version
    assert reg.rollback("GE", second.version).version == second.version
    newest = _record(reg, "GE")
    kept = [r.version for r in reg.versions("GE")]
    assert first.version not in kept and {second.version, newest.version} <= set(kept)
    assert not Path(first.adapter or "").exists()


@pytest.mark.parametrize("segment", ["../../etc", "a:b*", "x" * 10_000, "🔥 Bürsten", SHARED_SEGMENT])
def test_hostile_segment_names_stay_inside_the_store(reg: Registry, segment: str) -> None:
    rec = _record(reg, segment)
    path = Path(rec.adapter or "").resolve()
    assert path.is_relative_to(reg.store.resolve())
    assert len(path.relative_to(reg.store.resolve()).parts) == 2
    assert segment in reg.segments()
    assert reg.champion(segment) == rec


def test_shared_registry_is_a_separate_namespace(reg: Registry) -> None:
    segment = _record(reg, SHARED_SEGMENT)
    shared = _record(reg.shared(), SHARED_SEGMENT)
    assert segment.version == shared.version == 1
    assert reg.champion(SHARED_SEGMENT) == segment and reg.shared().champion(SHARED_SEGMENT) == shared
    assert segment.adapter != shared.adapter


def test_models_cli(
    reg: Registry, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    for key, value in {
        "WORKER_REDIS_URL": settings.redis_url,
        "WORKER_REDIS_PREFIX": settings.redis_prefix,
        "WORKER_MODEL_STORE": str(settings.model_store),
    }.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def models(*argv: str) -> int:
        return cli_main(parser.parse_args(argv))

    v1 = _record(reg, "GE").version
    v2 = _record(reg, "GE").version
    assert models("list") == 0
    out = capsys.readouterr().out
    assert f"GE  champion={v2}  serves=zero-shot  choice=none yet" in out and f"v{v1}" in out
    choice = ServingChoice(kind="zero_shot", shared_version=2, n=40, auc={"zero_shot": 0.7, "shared": 0.6})
    v3 = reg.next_version("GE")
    reg.record(version_record("GE", v3, None, decision="rejected", serving=choice))
    assert models("list", "GE") == 0
    assert "choice=zero_shot (chosen on shared v2, 40 pairs: zero_shot=0.700 shared=0.600)" in (
        capsys.readouterr().out
    )
    assert models("rollback", "GE", str(v1), "--expect", str(v1)) == 1, "a listing from before v2"
    assert reg.champion_version("GE") == v2 and "nothing rolled back" in capsys.readouterr().err
    assert models("rollback", "GE") == 0
    assert reg.champion_version("GE") == v1
    assert models("show", "GE") == 0
    assert f'"version": {v1}' in capsys.readouterr().out
    assert models("show", "nope") == 1


def test_the_shared_model_rolls_back_from_the_cli_after_six_rejections(
    reg: Registry, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    for key, value in {
        "WORKER_REDIS_URL": settings.redis_url,
        "WORKER_REDIS_PREFIX": settings.redis_prefix,
        "WORKER_MODEL_STORE": str(settings.model_store),
    }.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    shared = reg.shared()
    v1 = _record(shared, SHARED_SEGMENT).version
    v2 = _record(shared, SHARED_SEGMENT).version
    for _ in range(6):
        _record(shared, SHARED_SEGMENT, decision="rejected")
    assert cli_main(parser.parse_args(["rollback", "--shared"])) == 0
    assert shared.champion_version(SHARED_SEGMENT) == v1
    assert "shared: champion is now v" in capsys.readouterr().out
    assert cli_main(parser.parse_args(["--shared", "rollback", str(v2)])) == 0
    assert shared.champion_version(SHARED_SEGMENT) == v2
    assert (
        cli_main(parser.parse_args(["list", "--shared"]))
        == 0
        == cli_main(parser.parse_args(["rollback", str(v1), "--shared"]))
    )
    assert shared.champion_version(SHARED_SEGMENT) == v1
    assert f"shared  champion={v2}" in capsys.readouterr().out
    assert cli_main(parser.parse_args(["rollback", "GE", "--shared"])) == 2
    assert reg.champion_version(SHARED_SEGMENT) is None, "the segment namespace is untouched"


def test_a_serving_choice_is_stored_with_its_record_and_a_change_republishes_the_scores(
    reg: Registry, settings: Settings
) -> None:
    """The choice lives beside the records (one script, one slot), so a restart or a new owner reads it;
    a change of what serves counts as a move, so the outbox republishes the segment's scores."""
    assert reg.serving("GE") is None
    zero = ServingChoice(kind="zero_shot", shared_version=3, n=40, auc={"zero_shot": 0.7, "shared": 0.6})
    version = reg.next_version("GE")
    reg.record(version_record("GE", version, None, decision="rejected", serving=zero))
    assert reg.serving("GE") == zero
    assert Registry.from_settings(settings).serving("GE") == zero
    [moved] = reg.outboxes(["GE"])
    assert moved.rescore and moved.moves == 1
    reg.mark_published(moved)
    again = reg.next_version("GE")
    reg.record(version_record("GE", again, None, decision="rejected", serving=zero))
    [same] = reg.outboxes(["GE"])
    assert not same.rescore, "the same choice again changes no score"
    reg.forget("GE")
    assert reg.serving("GE") is None
