"""Registry records for tests that need versions without training a model."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.state.registry import SHARED_SEGMENT, VersionRecord


def version_record(segment: str, version: int, adapter: str | None, **fields: Any) -> VersionRecord:
    """A promoted segment version with test values; `fields` override any of them."""
    values: dict[str, Any] = {
        "scope": "segment",
        "segment": segment,
        "version": version,
        "parent_version": None,
        "decision": "promoted",
        "base_model": "test",
        "events_from": 0,
        "events_to": 1,
        "challenger": None,
        "champion": None,
        "device": "cpu",
        "train_seconds": 0.0,
        "created_at": datetime.now(UTC),
        "adapter": adapter,
    }
    return VersionRecord(**{**values, **fields})


def shared_record(version: int, adapter: Path, **fields: Any) -> VersionRecord:
    """A promoted shared version whose model lies at `adapter`; `fields` override as above."""
    return version_record(SHARED_SEGMENT, version, str(adapter), scope="shared", **fields)
