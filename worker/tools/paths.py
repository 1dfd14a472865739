"""Where the checkout's own files are: the one place that knows how deep this package sits."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCHEMAS_DIR = REPO / "schemas"
README = REPO / "README.md"
SHARED_DATA = REPO.parent / "shared" / "data"
