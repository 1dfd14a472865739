"""`bench ingest` on a small preloaded topic: the worker stores every offset, the ratio is what it says."""

from __future__ import annotations

import statistics

import pytest

from worker.config import Settings
from worker.state import client as redis_clients
from worker.tools.bench.ingest import RedisCounters, run_bench

pytestmark = pytest.mark.integration


def test_bench_ingest_stores_every_offset_and_reports_the_median_raw_run(settings: Settings) -> None:
    result = run_bench(settings, events=3000, segments=20, raw_repeats=3)

    assert result["stored_offsets"] == 3000
    assert len(result["raw_runs_s"]) == 3
    assert result["raw_s"] == pytest.approx(statistics.median(result["raw_runs_s"]), abs=1e-3)
    assert result["events_per_s"] == pytest.approx(3000 / result["worker_s"], rel=0.01)
    assert result["ratio"] == pytest.approx(result["events_per_s"] / result["raw_events_per_s"], abs=2e-3)
    assert 0 < result["partition0_events"] < 3000
    assert len(result["raw_decode_runs_s"]) == 3
    assert result["raw_decode_s"] == pytest.approx(statistics.median(result["raw_decode_runs_s"]), abs=1e-3)
    assert result["ratio_vs_decode"] == pytest.approx(
        result["events_per_s"] / result["raw_decode_events_per_s"], abs=2e-3
    )
    # the buffer script runs once per partition and batch, its commands variadic over the batch's events
    assert 0 < result["redis_calls_per_event"] < 5
    assert result["redis_cpu_us_per_event"] > 0


def test_redis_counters_count_a_scripts_own_commands_and_leave_out_info(settings: Settings) -> None:
    client = redis_clients.from_settings(settings)
    key = f"{settings.redis_prefix}:bench-counters"
    source = "redis.call('SET', KEYS[1], 1); redis.call('INCR', KEYS[1])"
    script = redis_clients.register_script(client, source)
    try:
        script(keys=[key])  # loaded now: the measured call is one EVALSHA, no NOSCRIPT retry
        before = RedisCounters.read(client)
        for _ in range(5):
            client.set(key, 0)
        script(keys=[key])
        RedisCounters.read(client)
        spent = RedisCounters.read(client).since(before)
    finally:
        client.delete(key)
        client.close()
    assert spent.calls == 5 + 3  # five SETs, then EVALSHA with its SET and INCR
    assert spent.cpu_s >= 0
