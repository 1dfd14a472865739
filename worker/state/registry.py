"""Model versions per segment: numbers, lineage, metrics, the champion pointer, and adapter directories.

Metadata lives in Redis, adapters in the model store (`<store>/<segment hash>/<version>/`). Version numbers
come from INCR, floored at the highest version in the store (`registry_next.lua`), so no two trainers,
threads or workers ever hand out the same one, even after Redis lost its data. The champion pointer
moves only through Lua compare-and-sets (`registry_promote.lua`: a slow trainer cannot overwrite a newer
champion; `registry_rollback.lua`: an operator cannot undo a promotion they did not see) and only ever
names a version whose directory is complete (adapters are written to a temp dir, then renamed).

The records are the outbox of what the worker publishes (`Registry.outboxes`): a decision is recorded
first, published after, and a per-segment `published` pointer moves forward once Kafka acknowledged its
model-version event and, when the champion moved, the segment's refreshed scores. A crash between the
two publishes them again later: delivery is at least once, and consumers dedupe model-version events by
(segment, version). An operator's pin (`worker.state.pins`) overrides what serves a segment; while it holds,
the promotion script refuses every promotion of the segment. Every key comes from `worker.state.keys`.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ConfigDict

from worker.config import Settings
from worker.events import ModelVersionEvent, ServingChoice, ServingPin
from worker.state import client as clients
from worker.state import keys
from worker.state.client import RedisClient
from worker.state.keys import RegistryPart, segment_hash
from worker.state.scripts import lua

SHARED_SEGMENT = "shared"
"""The shared model's name inside its own registry (`Registry.shared`), a namespace no segment reaches."""

_PROMOTE = lua("registry_promote.lua")
_ROLLBACK = lua("registry_rollback.lua")
_NEXT = lua("registry_next.lua")
_PUBLISHED = lua("registry_published.lua")
_STORED_VERSION = re.compile(r"^\.?(\d+)(\.tmp-.*)?$")
"""A version directory in the store, or its temp directory while it is written (`learn.store`)."""


class RegistryError(RuntimeError):
    """An unknown segment or version, or a rollback to a version that has no adapter."""


class VersionRecord(ModelVersionEvent):
    """A model-version event plus where its adapter lives (None when it was not promoted)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="VersionRecord")

    adapter: str | None = None

    def event(self) -> ModelVersionEvent:
        return ModelVersionEvent.model_validate(self.model_dump(exclude={"adapter"}))


@dataclass(frozen=True)
class Outbox:
    """A segment's decisions that Kafka has not acknowledged yet (`Registry.outboxes`)."""

    segment: str
    records: list[VersionRecord]
    """Recorded above the published pointer, oldest first: each one's model-version event is due."""
    moves: int
    """The champion moves counted when read: what `Registry.mark_published` records as published."""
    rescore: bool
    """The champion moved (a promotion or a rollback) since the segment's scores were last published."""


class Registry:
    def __init__(
        self,
        client: RedisClient,
        store: Path,
        prefix: str = "w",
        keep: int = 5,
        pinned_by: str | None = None,
    ) -> None:
        """`pinned_by`: the shared registry's, the pins index of the segments whose pins may name its
        versions (`pinned_versions`); a segment registry's pins index is its own."""
        self.client = client
        self.store = store
        self.prefix = prefix
        self.keep = keep
        self.pins_index = keys.pins_key(prefix) if pinned_by is None else pinned_by
        self._shared_scope = pinned_by is not None
        self._promote = clients.register_script(client, _PROMOTE)
        self._rollback = clients.register_script(client, _ROLLBACK)
        self._next = clients.register_script(client, _NEXT)
        self._published = clients.register_script(client, _PUBLISHED)

    @classmethod
    def from_settings(cls, settings: Settings, client: RedisClient | None = None) -> Registry:
        client = client or clients.from_settings(settings)
        return cls(client, settings.model_store, settings.redis_prefix, settings.keep_versions)

    def shared(self) -> Registry:
        """The registry of the model shared by all segments: same Redis, its own key prefix and directory."""
        return Registry(
            self.client,
            self.store / "shared",
            keys.shared_registry_prefix(self.prefix),
            self.keep,
            pinned_by=self.pins_index,
        )

    def _key(self, segment: str, part: RegistryPart) -> str:
        return keys.registry_key(self.prefix, segment_hash(segment), part)

    def adapter_dir(self, segment: str, version: int) -> Path:
        return self.store / segment_hash(segment) / f"{version:08d}"

    def stored_version(self, segment: str) -> int:
        """The highest version the model store holds for the segment, complete or being written (0: none,
        or a store it cannot read: then saving fails too, and the training is recorded as failed)."""
        try:
            names = os.listdir(self.store / segment_hash(segment))
        except OSError:
            return 0
        return max((int(m.group(1)) for m in map(_STORED_VERSION.match, names) if m), default=0)

    def next_version(self, segment: str) -> int:
        """Reserve a version number; reserved numbers are never handed out again, even if unused, nor
        after Redis lost its data: the number is above both Redis's counter and the store's versions.

        The segment's own keys change in one script (one hash slot); the index, in another slot on a
        Redis Cluster, is written first and on its own: an index entry without versions lists an empty
        segment, never a version that `segments()` cannot find."""
        name = segment.encode("utf-8", "surrogatepass")
        self.client.hset(keys.registry_index_key(self.prefix), segment_hash(segment), name)
        version = self._next(
            keys=[self._key(segment, "next"), self._key(segment, "name")],
            args=[self.stored_version(segment), name],
        )
        return int(version)

    def record(self, rec: VersionRecord, gated_against: int | None = None) -> VersionRecord:
        """Store a decision and return what was stored. A promoted one becomes champion only if the
        champion is still `gated_against` (None: no champion); otherwise the race is lost, and the record
        is stored as rejected with the reason and without its adapter: the challenger was never
        compared with the model that serves now. A promotion of a pinned segment is stored as rejected
        too, without its adapter or serving choice: the champion and the promoted records stay what
        served before the pin, so unpinning returns to a champion that did serve."""
        if rec.decision == "promoted" and (rec.adapter is None or not Path(rec.adapter).is_dir()):
            raise RegistryError(f"version {rec.version} of {rec.segment!r} has no complete adapter directory")
        parts: tuple[RegistryPart, ...] = ("records", "champion", "moves", "serving", "pin")
        record_keys = [self._key(rec.segment, part) for part in parts]
        promote = "1" if rec.decision == "promoted" else "0"
        serving = "" if rec.serving is None else rec.serving.model_dump_json()
        status, current = self._promote(
            keys=record_keys, args=[rec.version, rec.model_dump_json(), promote, gated_against or 0, serving]
        )
        if int(status) in (2, 3):
            assert rec.adapter is not None
            shutil.rmtree(rec.adapter, ignore_errors=True)
            reason = (
                f"lost the race: the champion moved from v{gated_against or 0} to v{int(current)} while "
                f"this challenger was judged ({rec.reason})"
                if int(status) == 2
                else f"pinned: the gate would promote it, but the segment is pinned ({rec.reason})"
            )
            rec = rec.model_copy(
                update={"decision": "rejected", "reason": reason, "adapter": None, "serving": None}
            )
            self._promote(keys=record_keys, args=[rec.version, rec.model_dump_json(), "0", 0, ""])
        self.prune(rec.segment)
        return rec

    def reserved(self, segment: str) -> int:
        """How many version numbers `next_version` has handed out for the segment (0: none yet)."""
        raw = self.client.get(self._key(segment, "next"))
        return int(raw) if raw else 0

    def champion_version(self, segment: str) -> int | None:
        raw = self.client.get(self._key(segment, "champion"))
        return int(raw) if raw else None

    def serving(self, segment: str) -> ServingChoice | None:
        """The segment's last serving choice (None: none made yet, it follows the shared model)."""
        raw = self.client.get(self._key(segment, "serving"))
        return ServingChoice.model_validate_json(raw) if raw else None

    def pin(self, segment: str) -> ServingPin | None:
        """The segment's pin (`worker.state.pins`), None when it is not pinned."""
        raw = self.client.get(self._key(segment, "pin"))
        return ServingPin.model_validate_json(raw) if raw else None

    def pinned_versions(self, segment: str) -> set[int]:
        """Versions a pin serves, which pruning keeps: in the shared registry every shared version a
        segment is pinned to, in a segment's its pinned adapter version."""
        if self._shared_scope:
            pins = map(ServingPin.model_validate_json, self.client.hvals(self.pins_index))
            return {p.shared_version for p in pins if p.kind != "zero_shot"}
        raw = self.client.hget(self.pins_index, segment_hash(segment))
        pin = ServingPin.model_validate_json(raw) if raw else None
        return {pin.version} if pin is not None and pin.kind == "adapter" else set()

    def get(self, segment: str, version: int) -> VersionRecord | None:
        raw = self.client.hget(self._key(segment, "records"), str(version))
        return VersionRecord.model_validate_json(raw) if raw else None

    def champion(self, segment: str) -> VersionRecord | None:
        version = self.champion_version(segment)
        return self.get(segment, version) if version else None

    def versions(self, segment: str) -> list[VersionRecord]:
        raw = self.client.hgetall(self._key(segment, "records"))
        records = [VersionRecord.model_validate_json(v) for v in raw.values()]
        return sorted(records, key=lambda r: r.version)

    def segments(self) -> list[str]:
        names = self.client.hvals(keys.registry_index_key(self.prefix))
        return sorted(n.decode("utf-8", "surrogatepass") for n in names)

    def rollback(
        self, segment: str, version: int | None = None, expected: int | None = None
    ) -> VersionRecord:
        """Point the champion at `version`, or at the promoted version before the current one, only if the
        champion is still `expected` (default: the one read here), so a promotion that landed meanwhile
        is never undone unseen. The move counts in `moves`, so the outbox republishes the scores."""
        current = self.champion_version(segment) if expected is None else expected or None
        promoted = [r for r in self.versions(segment) if r.decision == "promoted" and r.adapter]
        if version is None:
            older = [r for r in promoted if current is None or r.version < current]
            if not older:
                raise RegistryError(f"{segment!r} has no earlier promoted version to roll back to")
            target = older[-1]
        else:
            found = [r for r in promoted if r.version == version]
            if not found:
                raise RegistryError(f"{segment!r} has no promoted version {version} with an adapter")
            target = found[0]
        if target.adapter is None or not Path(target.adapter).is_dir():
            raise RegistryError(f"the adapter of version {target.version} is gone: {target.adapter}")
        moved, now = self._rollback(
            keys=[self._key(segment, "champion"), self._key(segment, "moves")],
            args=[target.version, current or 0],
        )
        if not int(moved):
            raise RegistryError(
                f"the champion of {segment!r} is v{int(now)}, not v{current or 0}: nothing rolled back"
            )
        return target

    def outboxes(self, segments: Sequence[str]) -> list[Outbox]:
        """The segments with decisions to publish, in one round trip when there are none."""
        pipe = self.client.pipeline(transaction=False)
        for segment in segments:
            pipe.hmget(self._key(segment, "published"), ["version", "moves"])
            pipe.get(self._key(segment, "moves"))
            pipe.hkeys(self._key(segment, "records"))
        raw = pipe.execute()
        out = []
        for i, segment in enumerate(segments):
            (version, published_moves), moves, recorded = raw[3 * i : 3 * i + 3]
            due = sorted(v for v in map(int, recorded) if v > int(version or 0))
            rescore = int(moves or 0) > int(published_moves or 0)
            if due or rescore:
                records = [r for r in (self.get(segment, v) for v in due) if r is not None]
                out.append(Outbox(segment, records, int(moves or 0), rescore))
        return out

    def mark_published(self, outbox: Outbox) -> None:
        """Kafka acknowledged the outbox's events (and scores, if due): move the pointer forward."""
        version = max((r.version for r in outbox.records), default=0)
        self._published(keys=[self._key(outbox.segment, "published")], args=[version, outbox.moves])

    def forget(self, segment: str) -> None:
        """Delete everything of an expired segment (`worker.state.retention`) but its version counter:
        a segment that comes back continues above its old numbers, so no (segment, version) a consumer
        has seen is ever handed out twice. The champion goes before the adapters it points at, the index
        entry last: a crash midway leaves unused directories or an empty index entry, nothing served."""
        parts: tuple[RegistryPart, ...] = (
            "champion",
            "records",
            "name",
            "moves",
            "published",
            "serving",
            "pin",
        )
        self.client.delete(*(self._key(segment, part) for part in parts))
        shutil.rmtree(self.store / segment_hash(segment), ignore_errors=True)
        self.client.hdel(self.pins_index, segment_hash(segment))
        self.client.hdel(keys.registry_index_key(self.prefix), segment_hash(segment))

    def prune(self, segment: str) -> list[int]:
        """Keep the champion, the newest `keep` promoted versions (the rollback targets, however many
        challengers were rejected since), the pinned ones and the newest `keep` records; delete the rest
        and their adapters."""
        records = self.versions(segment)
        champion = self.champion_version(segment)
        promoted = [r.version for r in records if r.decision == "promoted"]
        kept = {
            champion,
            *promoted[-self.keep :],
            *(r.version for r in records[-self.keep :]),
            *self.pinned_versions(segment),
        }
        doomed = [r for r in records if r.version not in kept]
        for rec in doomed:
            if rec.adapter:
                shutil.rmtree(rec.adapter, ignore_errors=True)
            self.client.hdel(self._key(segment, "records"), str(rec.version))
        return [r.version for r in doomed]
