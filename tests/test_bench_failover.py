"""`bench failover` on a small partition: both sides hand it over, the figures are what they say."""

from __future__ import annotations

import pytest

from worker.config import Settings
from worker.tools.bench.failover import run_bench

pytestmark = pytest.mark.integration


def test_bench_failover_moves_the_partition_to_the_survivor_on_both_sides(settings: Settings) -> None:
    result = run_bench(settings, events=2000, session_timeout_ms=6000)

    assert result["buffered_events"] == 2000
    # the survivor can only take over once the broker gave up on the killed owner's session
    assert result["raw_failover_s"] > 1.0 and result["failover_s"] > 1.0
    assert result["ratio"] == pytest.approx(result["failover_s"] / result["raw_failover_s"], abs=2e-3)
    assert result["redis_delta_bytes"] > 2000 * 100, "each buffered event costs Redis bytes"
    assert result["redis_bytes_per_100k_events"] == pytest.approx(result["redis_delta_bytes"] * 50, rel=1e-6)
    assert result["rss_bytes_per_100k_events"] == pytest.approx(result["rss_delta_bytes"] * 50, rel=1e-6)
