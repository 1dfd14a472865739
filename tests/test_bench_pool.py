"""`bench pool --train` on a tiny scale: the shared run it measures is the worker's own, on the bounded
pool, and reports its peak memory beside the pooling's."""

from __future__ import annotations

import pytest

from worker.config import Settings
from worker.state.buffer import Buffer
from worker.tools.bench.pool import run_bench

pytestmark = pytest.mark.integration


def test_a_whole_shared_run_is_measured_on_the_bounded_pool(settings: Settings) -> None:
    small = settings.model_copy(
        update={"shared_pool_max_events": 60, "max_seq_len": 16, "shared_min_holdout": 1, "device": "cpu"}
    )
    try:
        result = run_bench(small, segments=40, events=5, train=True)
    finally:
        Buffer(small).purge()
    assert result["buffered_events"] == 200 and result["read_all"]["events"] == 200
    assert result["pool"]["events"] <= 60
    run = result["shared_run"]
    assert run["events"] == result["pool"]["events"]
    assert 0 < run["trained_events"] <= run["events"]
    assert run["decision"] in {"promoted", "rejected"}
    assert run["peak_rss_mib"] > result["pool"]["peak_rss_mib"], "the backbone and training are counted"
