"""Model versions per segment: numbers, lineage, metrics, the champion pointer, and adapter directories.

Metadata lives in Redis, adapters in the model store (`<store>/<segment hash>/<version>/`). Version numbers
come from INCR, so no two trainers, threads or workers ever hand out the same one. The champion pointer
moves forward only through a Lua compare-and-set (`registry_promote.lua`: a slow trainer cannot overwrite
a newer champion) and only ever names a version whose directory is complete (adapters are written to a
temp dir, then renamed). Every key comes from `worker.state.keys`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import orjson
from pydantic import ConfigDict

from worker.config import Settings, load_settings
from worker.events import ModelVersionEvent
from worker.state import client as clients
from worker.state import keys
from worker.state.client import RedisClient
from worker.state.keys import RegistryPart, segment_hash
from worker.state.scripts import lua

SHARED_SEGMENT = "shared"
"""The shared model's name inside its own registry (`Registry.shared`), a namespace no segment reaches."""

_PROMOTE = lua("registry_promote.lua")


class RegistryError(RuntimeError):
    """An unknown segment or version, or a rollback to a version that has no adapter."""


class VersionRecord(ModelVersionEvent):
    """A model-version event plus where its adapter lives (None when it was not promoted)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="VersionRecord")

    adapter: str | None = None

    def event(self) -> ModelVersionEvent:
        return ModelVersionEvent.model_validate(self.model_dump(exclude={"adapter"}))


class Registry:
    def __init__(self, client: RedisClient, store: Path, prefix: str = "w", keep: int = 5) -> None:
        self.client = client
        self.store = store
        self.prefix = prefix
        self.keep = keep
        self._promote = clients.register_script(client, _PROMOTE)

    @classmethod
    def from_settings(cls, settings: Settings, client: RedisClient | None = None) -> Registry:
        client = client or clients.from_settings(settings)
        return cls(client, settings.model_store, settings.redis_prefix, settings.keep_versions)

    def shared(self) -> Registry:
        """The registry of the model shared by all segments: same Redis, its own key prefix and directory."""
        return Registry(
            self.client, self.store / "shared", keys.shared_registry_prefix(self.prefix), self.keep
        )

    def _key(self, segment: str, part: RegistryPart) -> str:
        return keys.registry_key(self.prefix, segment_hash(segment), part)

    def adapter_dir(self, segment: str, version: int) -> Path:
        return self.store / segment_hash(segment) / f"{version:08d}"

    def next_version(self, segment: str) -> int:
        """Reserve a version number; reserved numbers are never handed out again, even if unused.

        The segment's own keys change in one transaction (one hash slot); the index, in another slot on a
        Redis Cluster, is written first and on its own: an index entry without versions lists an empty
        segment, never a version that `segments()` cannot find."""
        name = segment.encode("utf-8", "surrogatepass")
        self.client.hset(keys.registry_index_key(self.prefix), segment_hash(segment), name)
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(self._key(segment, "next"))
        pipe.set(self._key(segment, "name"), name)
        version, _ = pipe.execute()
        return int(version)

    def record(self, rec: VersionRecord, gated_against: int | None = None) -> VersionRecord:
        """Store a decision and return what was stored. A promoted one becomes champion only if the
        champion is still `gated_against` (None: no champion); otherwise the race is lost, and the record
        is stored as rejected with the reason and without its adapter: the challenger was never
        compared with the model that serves now."""
        if rec.decision == "promoted" and (rec.adapter is None or not Path(rec.adapter).is_dir()):
            raise RegistryError(f"version {rec.version} of {rec.segment!r} has no complete adapter directory")
        record_keys = [self._key(rec.segment, "records"), self._key(rec.segment, "champion")]
        promote = "1" if rec.decision == "promoted" else "0"
        status, current = self._promote(
            keys=record_keys, args=[rec.version, rec.model_dump_json(), promote, gated_against or 0]
        )
        if int(status) == 2:
            assert rec.adapter is not None
            shutil.rmtree(rec.adapter, ignore_errors=True)
            rec = rec.model_copy(
                update={
                    "decision": "rejected",
                    "reason": f"lost the race: the champion moved from v{gated_against or 0} to "
                    f"v{int(current)} while this challenger was judged ({rec.reason})",
                    "adapter": None,
                }
            )
            self._promote(keys=record_keys, args=[rec.version, rec.model_dump_json(), "0", 0])
        self.prune(rec.segment)
        return rec

    def reserved(self, segment: str) -> int:
        """How many version numbers `next_version` has handed out for the segment (0: none yet)."""
        raw = self.client.get(self._key(segment, "next"))
        return int(raw) if raw else 0

    def champion_version(self, segment: str) -> int | None:
        raw = self.client.get(self._key(segment, "champion"))
        return int(raw) if raw else None

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

    def rollback(self, segment: str, version: int | None = None) -> VersionRecord:
        """Point the champion at `version`, or at the promoted version before the current champion."""
        current = self.champion_version(segment)
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
        self.client.set(self._key(segment, "champion"), target.version)
        return target

    def prune(self, segment: str) -> list[int]:
        """Keep the champion, the newest `keep` promoted versions (the rollback targets, however many
        challengers were rejected since) and the newest `keep` records; delete the rest and their adapters."""
        records = self.versions(segment)
        champion = self.champion_version(segment)
        promoted = [r.version for r in records if r.decision == "promoted"]
        kept = {champion, *promoted[-self.keep :], *(r.version for r in records[-self.keep :])}
        doomed = [r for r in records if r.version not in kept]
        for rec in doomed:
            if rec.adapter:
                shutil.rmtree(rec.adapter, ignore_errors=True)
            self.client.hdel(self._key(segment, "records"), str(rec.version))
        return [r.version for r in doomed]


# ---------------------------------------------------------------- CLI: python -m worker models ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show", "rollback"])
    parser.add_argument("segment", nargs="?", help="segment name (all segments for `list` when omitted)")
    parser.add_argument(
        "version", nargs="?", type=int, help="version (default: the champion / the one before)"
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="the model all segments share, instead of a segment: `models --shared rollback [VERSION]`",
    )


def _row(rec: VersionRecord, champion: int | None) -> str:
    auc = rec.challenger.auc if rec.challenger else None
    mark = "*" if rec.version == champion else " "
    auc_text = f"{auc:.4f}" if auc is not None else "  -   "
    when = f"{rec.created_at:%F %T}"
    return f"{mark} v{rec.version:<5} {rec.decision:<9} auc={auc_text} parent={rec.parent_version} {when}"


def cli_main(args: argparse.Namespace) -> int:
    reg = Registry.from_settings(load_settings())
    if args.shared:
        if args.segment is not None and args.version is None and args.segment.isdigit():
            args.version, args.segment = int(args.segment), None
        if args.segment is not None:
            print("error: --shared takes no segment name", file=sys.stderr)
            return 2
        reg, args.segment = reg.shared(), SHARED_SEGMENT
    if args.action == "list":
        segments = [args.segment] if args.segment else reg.segments()
        for segment in segments:
            champion = reg.champion_version(segment)
            print(f"{segment}  champion={champion}")
            for rec in reg.versions(segment):
                print("  " + _row(rec, champion))
        return 0
    if not args.segment:
        print("error: a segment is required", file=sys.stderr)
        return 2
    try:
        if args.action == "show":
            version = args.version or reg.champion_version(args.segment)
            shown = reg.get(args.segment, version) if version else None
            if shown is None:
                raise RegistryError(f"{args.segment!r} has no version {version}")
            print(orjson.dumps(shown.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode())
            return 0
        target = reg.rollback(args.segment, args.version)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.segment}: champion is now v{target.version}")
    return 0
