"""`python -m worker schemas`: regenerate `schemas/` from the wire types (a test fails on drift)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.events import write_schemas

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=SCHEMAS_DIR, help="target directory (default: schemas/)")


def cli_main(args: argparse.Namespace) -> int:
    for path in write_schemas(args.out):
        print(path)
    return 0
