"""`python -m worker dlq list|redrive`: what is in the dead-letter topic, and sending it back once fixed.

`list` only reads (`worker.tools.dlq_read`); `redrive` is `worker.tools.redrive`. Both print a summary per
`dlq.reason`, or JSON with `--json`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson
import redis

from worker.config import load_settings
from worker.stream.dlq import DeadLetterRecord
from worker.tools.dlq_read import DlqReadError, read_dlq
from worker.tools.redrive import RedriveError, Redriver, RedriveResult, since_ms_of

PREVIEW_CHARS = 80


def _since(value: str) -> int:
    try:
        return since_ms_of(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO datetime: {value!r}") from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,redrive}")
    listing = sub.add_parser(
        "list",
        help="counts per reason and the first messages (reads only; commits nothing)",
        description="Counts per dlq.reason and the first N dead letters, read from the DLQ up to its end.",
    )
    listing.add_argument("--limit", type=_positive, default=20, metavar="N", help="messages shown (20)")
    redrive = sub.add_parser(
        "redrive",
        help="send dead letters back to the topic they came from, each once",
        description="Produce each matching dead letter's original key, value and headers back to its "
        "source topic and partition, once across runs; skips those re-driven WORKER_DLQ_REDRIVE_MAX "
        "times and those cut to fit the DLQ.",
    )
    redrive.add_argument(
        "--since",
        type=_since,
        metavar="T",
        help="only dead letters written at or after T (ISO datetime; UTC without a zone)",
    )
    redrive.add_argument("--dry-run", action="store_true", help="report what would be sent; send nothing")
    for p in (listing, redrive):
        p.add_argument(
            "--reason", action="append", default=[], metavar="CODE", help="only this dlq.reason (repeatable)"
        )
        p.add_argument("--json", action="store_true", help="one JSON document instead of text")


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    reasons = frozenset(args.reason)
    try:
        if args.action == "list":
            return _list(read_dlq(settings), reasons, args.limit, args.json)
        redriver = Redriver(settings, reasons=reasons, since_ms=args.since, dry_run=args.dry_run)
        result = redriver.run()
    except (DlqReadError, RedriveError, redis.RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_redrive(result, args.dry_run, args.json)
    return 1 if result.failed else 0


def preview(value: bytes | None) -> str:
    """The start of a value as one line of printable text: no terminal escape reaches the screen."""
    if value is None:
        return "(no value)"
    text = value[:PREVIEW_CHARS].decode("utf-8", "backslashreplace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return shown + ("..." if len(value) > PREVIEW_CHARS else "")


def _row(record: DeadLetterRecord) -> dict[str, Any]:
    return {
        "dlq_partition": record.partition,
        "dlq_offset": record.offset,
        "reason": record.reason,
        "message": record.message[:300],
        "source_topic": record.source_topic,
        "source_partition": record.source_partition,
        "source_offset": record.source_offset,
        "redrive_count": record.redrive_count,
        "truncated": list(record.truncated),
        "timestamp_ms": record.timestamp_ms,
        "preview": preview(record.value),
    }


def _list(records: Iterable[DeadLetterRecord], reasons: frozenset[str], limit: int, as_json: bool) -> int:
    counts: Counter[str] = Counter()
    shown: list[dict[str, Any]] = []
    for record in records:
        if reasons and record.reason not in reasons:
            continue
        counts[record.reason] += 1
        if len(shown) < limit:
            shown.append(_row(record))
    if as_json:
        doc = {"total": sum(counts.values()), "counts": dict(sorted(counts.items())), "messages": shown}
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{sum(counts.values())} dead letters")
    for reason, n in sorted(counts.items()):
        print(f"  {reason:<24} {n}")
    for row in shown:
        src = f"{row['source_topic']}/{row['source_partition']}@{row['source_offset']}"
        print(
            f"{row['dlq_partition']}@{row['dlq_offset']} {row['reason']} from {src} "
            f"redriven={row['redrive_count']} {row['preview']}"
        )
    return 0


def _print_redrive(result: RedriveResult, dry_run: bool, as_json: bool) -> None:
    reasons = sorted(set(result.sent) | set(result.skipped))
    if as_json:
        doc = {
            "dry_run": dry_run,
            "sent": {r: result.sent[r] for r in reasons if result.sent[r]},
            "skipped": {r: dict(result.skipped[r]) for r in reasons if r in result.skipped},
            "already_redriven": result.already,
            "failed": result.failed,
        }
        print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        return
    verb = "would send" if dry_run else "sent"
    print(
        f"{verb} {sum(result.sent.values())}, skipped {sum(sum(c.values()) for c in result.skipped.values())}"
    )
    for reason in reasons:
        skipped = result.skipped.get(reason, Counter())
        why = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        detail = f" ({why})" if why else ""
        print(f"  {reason:<24} {verb} {result.sent[reason]:<6} skipped {sum(skipped.values())}{detail}")
    for failure in result.failed:
        print(f"  failed: {failure}", file=sys.stderr)
