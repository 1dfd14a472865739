"""Operator pins: a segment served by what an operator names (zero-shot, a shared version, the blend of
a shared version and zero-shot, one of its adapter versions), whatever its serving choice or a later
promotion says, until it is unpinned.

A pin lives in Redis, so it holds across restarts and changes of partition owner. Pinning and unpinning
each take a version number of the segment and record a model-version event (decision `pinned` /
`unpinned`): consumers dedupe those events by (segment, version), so an operator's decision needs its own
number as much as a training's does. The record, the pin and a move of `moves` are written by one script
(`registry_pin.lua`), so the worker's outbox publishes the event and the segment's refreshed scores; a
counter (`keys.pins_changed_key`) tells every worker to read its outboxes at once instead of at the next
periodic check. While pinned, the promotion script refuses the segment's promotions
(`Registry.record`), so trainings go on but the champion stays the one that served before the pin.

A pin names versions that exist now, with their directories in the store: the pins index
(`keys.pins_key`) is written before the pin and read by pruning, which then keeps them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from worker.events import ServingChoice, ServingKind, ServingPin
from worker.state import client as clients
from worker.state import keys
from worker.state.client import RedisClient
from worker.state.keys import RegistryPart, segment_hash
from worker.state.registry import SHARED_SEGMENT, Registry, VersionRecord
from worker.state.scripts import lua

_PIN = lua("registry_pin.lua")
TARGETS = "zero-shot, shared, blend or an adapter version number"


class PinError(RuntimeError):
    """A pin that cannot hold: an unknown segment or version, or a version whose files are gone."""


def target_text(pin: ServingPin) -> str:
    """What a pin serves: `zero-shot`, `shared v3`, `adapter v7 on shared v3`."""
    if pin.kind == "zero_shot":
        return "zero-shot"
    if pin.kind == "shared":
        return f"shared v{pin.shared_version}"
    if pin.kind == "blend":
        return f"the blend of shared v{pin.shared_version} and zero-shot"
    return f"adapter v{pin.version} on shared v{pin.shared_version}"


def describe(pin: ServingPin) -> str:
    """A pin as `models list` and its model-version event show it."""
    why = f": {pin.reason}" if pin.reason else ""
    return f"pinned to {target_text(pin)} since {pin.pinned_at:%F %T}{why}"


def _target(registry: Registry, segment: str, target: str, reason: str) -> ServingPin:
    """The pin `target` names, checked against the registry and the store."""
    now = datetime.now(UTC)
    if target in ("zero-shot", "zero_shot"):
        return ServingPin(kind="zero_shot", version=0, shared_version=0, reason=reason, pinned_at=now)
    shared = registry.shared()
    if target in ("shared", "blend"):
        champion = shared.champion(SHARED_SEGMENT)
        if champion is None:
            raise PinError(f"no shared model serves yet: there is no shared version to pin {target} to")
        _require_dir(champion, f"shared v{champion.version}")
        kind: ServingKind = "blend" if target == "blend" else "shared"
        return ServingPin(kind=kind, version=0, shared_version=champion.version, reason=reason, pinned_at=now)
    if not target.isdigit() or int(target) < 1:
        raise PinError(f"unknown pin target {target!r}: give {TARGETS}")
    version = int(target)
    rec = registry.get(segment, version)
    if rec is None or rec.decision != "promoted" or rec.shared_version is None:
        raise PinError(f"{segment!r} has no promoted adapter version {version} (`models list {segment}`)")
    _require_dir(rec, f"adapter v{version} of {segment!r}")
    base = shared.get(SHARED_SEGMENT, rec.shared_version)
    if base is None:
        raise PinError(
            f"adapter v{version} of {segment!r} was trained on shared v{rec.shared_version}, which the "
            "registry no longer holds"
        )
    _require_dir(base, f"shared v{rec.shared_version}, which adapter v{version} was trained on,")
    return ServingPin(
        kind="adapter", version=version, shared_version=rec.shared_version, reason=reason, pinned_at=now
    )


def _require_dir(rec: VersionRecord, what: str) -> None:
    if rec.adapter is None or not Path(rec.adapter).is_dir():
        raise PinError(f"{what} has no directory in the model store: {rec.adapter}")


def _record(
    registry: Registry,
    segment: str,
    pin: ServingPin | None,
    serving: ServingChoice | None,
    reason: str,
    base_model: str,
) -> VersionRecord:
    """Reserve a version and store the pin or unpin record, the pin and a move in one script."""
    version = registry.next_version(segment)
    rec = VersionRecord(
        scope="segment",
        segment=segment,
        version=version,
        parent_version=registry.champion_version(segment),
        decision="unpinned" if pin is None else "pinned",
        reason=reason,
        base_model=base_model,
        events_from=0,
        events_to=0,
        shared_version=None if pin is None else pin.shared_version,
        challenger=None,
        champion=None,
        device="operator",
        train_seconds=0.0,
        created_at=datetime.now(UTC),
        serving=serving,
        pinned=pin,
    )
    script = clients.register_script(registry.client, _PIN)
    parts: tuple[RegistryPart, ...] = ("records", "moves", "pin")
    script(
        keys=[keys.registry_key(registry.prefix, segment_hash(segment), part) for part in parts],
        args=[version, rec.model_dump_json(), "" if pin is None else pin.model_dump_json()],
    )
    return rec


def _changed(client: RedisClient, prefix: str) -> None:
    client.incr(keys.pins_changed_key(prefix))


def changes(client: RedisClient, prefix: str) -> int:
    """How many pins and unpins there have been: a worker republishes when it moves."""
    raw = client.get(keys.pins_changed_key(prefix))
    return int(raw) if raw else 0


def pin(registry: Registry, segment: str, target: str, reason: str, base_model: str) -> VersionRecord:
    """Pin a segment the registry knows to `target` (`TARGETS`); `shared` names the shared champion of
    now. Raises `PinError`, changing nothing, when the target does not exist or its files are gone."""
    if segment_hash(segment) not in {segment_hash(s) for s in registry.segments()}:
        raise PinError(f"unknown segment {segment!r}: the registry has no versions of it (`models list`)")
    wanted = _target(registry, segment, target, reason)
    registry.client.hset(registry.pins_index, segment_hash(segment), wanted.model_dump_json())
    try:
        _target(registry, segment, target, reason)
    except PinError:
        _restore_index(registry, segment)
        raise
    serving = ServingChoice(
        kind=wanted.kind, shared_version=wanted.shared_version, n=0, auc={}, reason=describe(wanted)
    )
    rec = _record(registry, segment, wanted, serving, describe(wanted), base_model)
    _changed(registry.client, registry.prefix)
    return rec


def _restore_index(registry: Registry, segment: str) -> None:
    """Put the pins index back as the segment's pin has it (a check that failed after it was written)."""
    current = registry.pin(segment)
    if current is None:
        registry.client.hdel(registry.pins_index, segment_hash(segment))
    else:
        registry.client.hset(registry.pins_index, segment_hash(segment), current.model_dump_json())


def unpin(registry: Registry, segment: str, reason: str, base_model: str) -> VersionRecord:
    """Return a pinned segment to its automatic choice; `PinError`, changing nothing, when not pinned."""
    current = registry.pin(segment)
    if current is None:
        raise PinError(f"{segment!r} is not pinned")
    why = f": {reason}" if reason else ""
    text = f"unpinned from {target_text(current)}, back to its automatic choice{why}"
    rec = _record(registry, segment, None, registry.serving(segment), text, base_model)
    registry.client.hdel(registry.pins_index, segment_hash(segment))
    _changed(registry.client, registry.prefix)
    return rec
