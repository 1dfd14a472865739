"""The worker's Redis state on a real Redis Cluster: three masters from the machine's `redis-server`, joined
by `redis-cli --cluster create` (`stack up --redis-cluster`), on ports of its own, stopped at its end.

The integration tests of ingest (dead letters), of a SIGKILLed ingest process (the ten-kill twin of the
fault tests), of a rebalance between two consumers and of the registry run unchanged against the cluster
(imported from their modules, given cluster settings). Then: every event counted once, keys on all three
masters (the per-node counts are printed), and no master ever answered CROSSSLOT.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import test_ingest
import test_registry
from ingest_helpers import event_doc, ingest_all, produce_docs, stored_event_ids, total_stats
from worker_helpers import WorkerProc, worker_env

from worker.config import ConfigError, Settings, load_settings
from worker.state import client as clients
from worker.state.buffer import Buffer
from worker.state.keys import prefix_pattern
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.stream.kafka import ensure_topics
from worker.tools import stack as stack_mod
from worker.tools.run_settings import isolated

ROOT = Path(__file__).resolve().parents[1]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A port P with P..P+2 and their cluster-bus ports (P+10000..) free."""
    for base in range(31_000 + uuid.uuid4().int % 4000, 40_000, 7):
        if all(_free(p) and _free(p + 10_000) for p in range(base, base + 3)):
            return base
    raise RuntimeError("no three free ports for the Redis Cluster")


def _stack_cli(action: str, settings: Settings, *flags: str) -> str:
    """`python -m worker stack ACTION` as an operator types it, on `settings`' Redis and cache directory;
    Kafka is named external so this stack leaves the shared test broker alone."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WORKER_")},
        "WORKER_CACHE_DIR": str(settings.cache_dir),
        "WORKER_REDIS_URL": settings.redis_url,
        "WORKER_KAFKA_BOOTSTRAP": "10.255.255.1:9092",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "stack", action, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def cluster(stack: Settings) -> Iterator[Settings]:
    base = _free_base()
    home = stack.cache_dir / f"cluster-{uuid.uuid4().hex[:8]}"
    s = stack.model_copy(update={"redis_url": f"redis+cluster://127.0.0.1:{base}", "cache_dir": home})
    try:
        out = _stack_cli("up", s, "--redis-cluster")
        assert f"redis-cluster: 3 masters on 127.0.0.1:{base},{base + 1},{base + 2}, cluster_state ok" in out
        assert "kafka: external, not started" in out
        yield s
    finally:
        out = _stack_cli("down", s)
        assert out.count("stopped (pid") >= 3 or "not running" in out, out
        assert stack_mod.started_pids(s) == []
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def cs(cluster: Settings, unique: str, tmp_path: Path) -> Settings:
    """Like conftest's `settings`, on the cluster."""
    return isolated(cluster, f"t{unique}", model_store=tmp_path / "models")


# ------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+cluster://127.0.0.1", "host:port"),
        ("redis+cluster://127.0.0.1:7000/2", "only database 0"),
        ("redis+cluster://127.0.0.1:7000,b", "host:port"),
        ("redis+cluster://127.0.0.1:7000/?x=1", "query string"),
        ("redis+cluster://u:secret@h:99999", "host:port"),
    ],
)
def test_a_malformed_cluster_url_fails_at_start_up_naming_the_setting(
    clean_env: pytest.MonkeyPatch, url: str, why: str
) -> None:
    clean_env.setenv("WORKER_REDIS_URL", url)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "WORKER_REDIS_URL" in str(err.value) and why in str(err.value)
    assert "secret" not in str(err.value)


def test_a_cluster_url_builds_the_cluster_client_and_a_plain_one_does_not() -> None:
    seeds = "redis+cluster://u:pw@127.0.0.1:1,127.0.0.1:2/0"
    assert Settings(redis_url=seeds).redis_url == seeds
    with pytest.raises(redis.ConnectionError, match="WORKER_REDIS_URL"):  # nothing listens at either seed
        clients.connect(seeds, socket_connect_timeout=0.2)
    assert isinstance(clients.connect("redis://127.0.0.1:1/0"), redis.Redis)


# ------------------------------------------------------------------------------------------ the stack


@pytest.mark.integration
def test_stack_up_redis_cluster_needs_a_cluster_url(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WORKER_")},
        "WORKER_CACHE_DIR": str(tmp_path),
        "WORKER_REDIS_URL": "redis://127.0.0.1:1/0",
        "WORKER_KAFKA_BOOTSTRAP": "10.255.255.1:9092",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "stack", "up", "--redis-cluster"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1 and "WORKER_REDIS_URL=redis+cluster://" in proc.stderr, proc.stderr


@pytest.mark.integration
def test_the_cluster_has_three_masters_and_answers_the_status_command(cluster: Settings) -> None:
    client = clients.from_settings(cluster)
    assert isinstance(client, redis.RedisCluster)
    assert len(client.get_primaries()) == 3
    assert stack_mod.status(cluster)["redis"]["healthy"] is True


# -------------------------------------------------------------------------------------- the worker's tests


@pytest.mark.integration
def test_ingest_dead_letters_on_the_cluster(cs: Settings) -> None:
    test_ingest.test_thousand_bad_messages_go_to_the_dlq_and_no_valid_event_is_lost(cs)


@pytest.mark.integration
def test_sigkilled_ingest_on_the_cluster_counts_every_event_once(cs: Settings) -> None:
    test_ingest.test_sigkilled_worker_restarted_ten_times_counts_every_event_once(cs)


@pytest.mark.integration
def test_rebalance_on_the_cluster_loses_and_doubles_nothing(cs: Settings) -> None:
    test_ingest.test_two_consumers_split_the_segments_and_a_rebalance_loses_and_doubles_nothing(cs)


@pytest.mark.integration
def test_registry_on_the_cluster(cs: Settings) -> None:
    """The registry's own tests, each on a fresh prefix of the cluster."""
    for n, check in enumerate(
        [
            test_registry.test_versions_are_unique_and_increasing_under_concurrency,
            test_registry.test_two_concurrent_trainers_never_move_the_champion_back,
            test_registry.test_rejected_versions_are_recorded_but_not_champion,
            test_registry.test_promotion_needs_a_complete_adapter_dir,
            test_registry.test_rollback,
            test_registry.test_rollback_is_fenced_on_the_champion_the_operator_saw,
            test_registry.test_the_outbox_holds_every_decision_and_champion_move_until_published,
            test_registry.test_shared_registry_is_a_separate_namespace,
        ]
    ):
        check(
            Registry.from_settings(
                isolated(cs, f"{cs.redis_prefix}r{n}", model_store=cs.model_store / str(n))
            )
        )
    test_registry.test_prune_keeps_the_last_n_promoted_versions_however_many_were_rejected(
        isolated(cs, f"{cs.redis_prefix}p", model_store=cs.model_store / "p")
    )
    reg = Registry.from_settings(isolated(cs, f"{cs.redis_prefix}h", model_store=cs.model_store / "h"))
    for segment in ["../../etc", "a:b*", "x" * 10_000, "🔥 Bürsten", SHARED_SEGMENT]:
        test_registry.test_hostile_segment_names_stay_inside_the_store(reg, segment)


@pytest.mark.integration
def test_keys_spread_over_all_three_masters_and_every_event_counts_once(
    cs: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    partitions, n = 24, 2400
    s = cs.model_copy(update={"topic_partitions": partitions})
    ensure_topics(s, [s.input_topic, s.dlq_topic], partitions=partitions)
    docs = [event_doc(i, f"seg-{i % 60}") for i in range(n)]
    produce_docs(s, docs)
    ingestor = ingest_all(s, timeout_s=120)
    buffer = ingestor.buffer
    assert isinstance(buffer.redis, redis.RedisCluster)
    stats = total_stats(buffer, partitions)
    assert stats["events"] == n and stats.get("duplicates", 0) == 0
    assert sorted(stored_event_ids(buffer, partitions)) == sorted(d["event_id"] for d in docs)
    reg = Registry.from_settings(s)
    for i in range(60):
        reg.next_version(f"seg-{i}")
    counts = clients.master_key_counts(buffer.redis, prefix_pattern(s.redis_prefix))
    with capsys.disabled():
        print(f"\nkeys per master of {n} events on {partitions} partitions and 60 segments: {counts}")
    assert len(counts) == 3 and all(c > 0 for c in counts.values()), counts
    assert sum(counts.values()) == sum(
        1 for _ in buffer.redis.scan_iter(match=prefix_pattern(s.redis_prefix))
    )
    assert Buffer(s).purge() == sum(counts.values())


@pytest.mark.integration
def test_a_worker_process_on_the_cluster_gets_ready_and_drains(
    cs: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    import json
    import time
    import urllib.error
    import urllib.request

    ensure_topics(cs, [cs.input_topic])
    worker = WorkerProc(worker_env(cs), tmp_path / "worker.log")
    procs.append(worker)
    port = worker.wait_for_event("metrics endpoint", 120)["port"]
    produce_docs(cs, [event_doc(i, f"seg-{i % 5}") for i in range(50)])
    deadline = time.monotonic() + 90
    body: dict[str, object] = {}
    while body.get("ready") is not True:
        assert time.monotonic() < deadline, body
        try:
            body = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5))
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
            time.sleep(0.5)
    buffer = Buffer(cs)
    while sum(buffer.partition_stats(p).get("events", 0) for p in range(cs.topic_partitions)) < 50:
        assert time.monotonic() < deadline and worker.alive(), worker.tail()
        time.sleep(0.3)
    assert worker.terminate() == 0
    buffer.purge()


def test_a_worker_whose_cluster_is_unreachable_fails_at_start_up_naming_the_setting(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WORKER_")},
        "WORKER_REDIS_URL": "redis+cluster://127.0.0.1:1",
        "WORKER_MODEL_STORE": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2 and "WORKER_REDIS_URL" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_no_master_ever_answered_crossslot(cluster: Settings) -> None:
    """Runs after the tests above (file order): a cross-slot script, transaction or command anywhere in
    them would show in a master's error statistics, even where the caller swallowed it."""
    client = clients.from_settings(cluster)
    assert isinstance(client, redis.RedisCluster)
    for node in client.get_primaries():
        errors = client.get_redis_connection(node).info("errorstats")
        assert not any("CROSSSLOT" in key for key in errors), (node.name, errors)


@pytest.mark.integration
def test_bench_ingest_runs_on_the_cluster_beside_the_single_node_and_deletes_its_topics(
    stack: Settings, cluster: Settings
) -> None:
    from worker.stream.kafka import make_admin
    from worker.tools.bench.ingest import run_bench

    result = run_bench(stack, events=3000, segments=20, raw_repeats=1, redis_cluster=cluster.redis_url)
    assert result["stored_offsets"] == 3000
    on_cluster = result["redis_cluster"]
    assert on_cluster["stored_offsets"] == 3000 and on_cluster["masters"] == 3
    assert on_cluster["ratio"] == pytest.approx(
        on_cluster["events_per_s"] / result["raw_events_per_s"], abs=2e-3
    )
    assert on_cluster["vs_single_node"] == pytest.approx(
        on_cluster["events_per_s"] / result["events_per_s"], abs=2e-3
    )
    topics = make_admin(stack).list_topics(timeout=10).topics
    assert result["topic"] not in topics and f"{result['topic']}-dlq" not in topics
