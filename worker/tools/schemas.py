"""`python -m worker schemas`: regenerate what is derived from the code: `schemas/` from the wire types and
the README's settings table from the Settings class. Tests fail when either has drifted."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.events import write_schemas
from worker.tools.paths import README, SCHEMAS_DIR
from worker.tools.run_settings import settings_table

TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"


def readme_with_table(text: str) -> str:
    """`text` with the generated settings table between its two markers."""
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    return f"{head}{TABLE_START}\n{settings_table()}\n{TABLE_END}{tail}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=SCHEMAS_DIR, help="schema directory (default: schemas/)")
    parser.add_argument("--readme", type=Path, default=README, help="README whose settings table to refresh")


def cli_main(args: argparse.Namespace) -> int:
    for path in write_schemas(args.out):
        print(path)
    if args.readme.exists():
        args.readme.write_text(readme_with_table(args.readme.read_text()))
        print(args.readme)
    return 0
