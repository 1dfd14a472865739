"""Faults injected into real worker processes: SIGKILLs, a broker outage, a Redis outage, a broken model
store, diverging trainings, and a secured broker (SASL/PLAIN + ACLs).

Outages never touch the shared test stack: each outage test runs on a private stack (free ports, its own
directory, the cached Kafka jars), like tests/test_stack.py. Worker settings are CPU-sized (16 tokens,
one epoch) and the gate is opened wide, as in tests/test_app.py, so trainings promote within seconds.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, Producer
from worker_helpers import WorkerProc, in_stream_order, read_all, worker_env

from worker.config import Settings, load_settings
from worker.events import ClickEvent
from worker.state.buffer import Buffer
from worker.state.keys import segment_hash
from worker.state.registry import SHARED_SEGMENT, Registry
from worker.stream.kafka import ensure_topics, partition_count
from worker.tools import stack as stack_mod
from worker.tools.datasets import load_homedepot
from worker.tools.procs import free_port
from worker.tools.replay import produce_events

pytestmark = [pytest.mark.faults, pytest.mark.integration]

SEGMENTS = ("Hampton Bay", "GE")
NO_TRAINING = {
    "WORKER_MIN_NEW_EVENTS": "100000",
    "WORKER_SHARED_BOOTSTRAP_MIN_EVENTS": "100000",
}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def events() -> list[ClickEvent]:
    """48 events of each test segment plus 160 of others (the shared model needs pooled data)."""
    stream = load_homedepot().stream()
    picked = [e for s in SEGMENTS for e in [x for x in stream if x.segment == s][:48]]
    others = [e for e in stream if e.segment not in SEGMENTS][:160]
    return in_stream_order(picked + others)


# On top of worker_helpers.SMALL: every version kept, a short back-off after a failed training.
FAULTS: dict[str, object] = {"keep_versions": 1000, "train_backoff_s": 2}


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return worker_env(settings, FAULTS, **extra)


def _counted(settings: Settings) -> tuple[int, int]:
    """(events, duplicates) summed over the input partitions' Redis stats."""
    buffer = Buffer(settings)
    stats = [buffer.partition_stats(p) for p in range(partition_count(settings, settings.input_topic))]
    return sum(s.get("events", 0) for s in stats), sum(s.get("duplicates", 0) for s in stats)


def _wait_counted(settings: Settings, n: int, timeout_s: float, alive: WorkerProc | None = None) -> int:
    deadline = time.monotonic() + timeout_s
    got = -1
    while time.monotonic() < deadline:
        try:
            got = _counted(settings)[0]
        except redis.RedisError:
            got = -1
        if got >= n:
            return got
        if alive is not None and alive.proc.poll() is not None:
            return got
        time.sleep(0.3)
    return got


def _stored_event_ids(settings: Settings) -> list[str]:
    """Every event id kept in the segment buffers (the sample holds all of them at these sizes)."""
    buffer = Buffer(settings)
    ids: list[str] = []
    for p in range(partition_count(settings, settings.input_topic)):
        for segment in buffer.segments(p):
            snap = buffer.training_snapshot(p, segment)
            ids += [e.event_id for e in [*snap.sample_events, *snap.new_events]]
    return ids


def _complete(adapter: Path, scope: str) -> bool:
    if scope == "shared":
        return (
            (adapter / "encoder").is_dir()
            and any((adapter / "encoder").iterdir())
            and (adapter / "head.safetensors").is_file()
        )
    return (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()


def _check_registry_and_store(settings: Settings, versions: list[dict[str, Any]]) -> dict[str, Any]:
    """Versions strictly increase per (scope, segment), none reused; every promoted record's directory is
    complete; the champion is a promoted, complete version; no record points at a missing dir."""
    registry = Registry.from_settings(settings)
    report: dict[str, Any] = {"orphan_dirs": []}
    for scope, reg, names in (
        ("shared", registry.shared(), [SHARED_SEGMENT]),
        ("segment", registry, registry.segments()),
    ):
        for segment in names:
            # At least once: a kill between delivery and the outbox pointer republishes the same event.
            payloads = {
                orjson.dumps(v, option=orjson.OPT_SORT_KEYS): v["version"]
                for v in versions
                if (v["scope"], v["segment"]) == (scope, segment)
            }
            published = list(dict.fromkeys(payloads.values()))
            assert published == sorted(published), f"{scope}/{segment} versions out of order: {published}"
            assert len(published) == len(payloads), f"{scope}/{segment} version reused: {payloads}"
            records = reg.versions(segment)
            numbers = [r.version for r in records]
            assert len(set(numbers)) == len(numbers)
            assert set(published) <= set(numbers), (
                f"published but not recorded: {set(published) - set(numbers)}"
            )
            nxt = int(reg.client.get(reg._key(segment, "next")) or 0)
            assert not numbers or max(numbers) <= nxt
            referenced = set()
            for rec in records:
                if rec.decision == "promoted":
                    assert rec.adapter is not None
                    assert _complete(Path(rec.adapter), scope), f"partial or missing dir: {rec.adapter}"
                    referenced.add(Path(rec.adapter).name)
                else:
                    assert rec.adapter is None
            champion = reg.champion(segment)
            if champion is not None:
                assert champion.decision == "promoted" and champion.adapter is not None
                assert _complete(Path(champion.adapter), scope)
            seg_dir = reg.store / segment_hash(segment)
            if seg_dir.is_dir():
                for d in seg_dir.iterdir():
                    if not d.name.startswith(".") and d.name not in referenced:
                        report["orphan_dirs"].append(str(d))
    leftovers = [str(p) for p in settings.model_store.rglob("*") if ".tmp-" in p.name]
    report["tmp_dirs"] = leftovers
    return report


# ---------------------------------------------------------------- 1. random SIGKILLs


def test_random_sigkills_during_replay_and_training(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    """20 SIGKILLs at random moments (1–4 s after the worker was assigned its partitions, while events
    arrive and trainings run), a restart after each, then a clean run to the end."""
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    rng = random.Random(int(os.environ.get("FAULTS_SEED", "7")))
    env = _env(
        settings,
        WORKER_GROUP_INSTANCE_ID=f"faults-{uuid.uuid4().hex[:6]}",
        WORKER_SESSION_TIMEOUT_MS="10000",
    )
    log = tmp_path / "worker.log"
    chunks = [events[i : i + 24] for i in range(0, len(events), 24)]
    produced = 0
    hit: dict[str, int] = {}
    for cycle in range(20):
        worker = WorkerProc(env, log)
        procs.append(worker)
        if chunks:
            produced += produce_events(settings, chunks.pop(0), restamp=True)
        worker.wait_for_event("assigned", 60)
        time.sleep(rng.uniform(1.0, 4.0))
        last = [
            r.get("event") for r in worker.lines() if r.get("event") not in ("progress", "metrics endpoint")
        ]
        phase = str(last[-1]) if last else "start-up"
        hit[phase] = hit.get(phase, 0) + 1
        worker.kill()
        assert worker.proc.returncode == -signal.SIGKILL, f"cycle {cycle}: worker exited by itself"
    assert not chunks and produced == len(events)
    print(f"kills landed after these log events: {hit}")

    final = WorkerProc(env, log)
    procs.append(final)
    assert _wait_counted(settings, len(events), 120, final) == len(events)
    registry = Registry.from_settings(settings)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not all(registry.champion_version(s) for s in SEGMENTS):
        assert final.proc.poll() is None, final.tail()
        time.sleep(0.5)
    assert all(registry.champion_version(s) for s in SEGMENTS), "no champion after the kills"
    assert final.terminate() == 0

    counted, duplicates = _counted(settings)
    assert counted == len(events), "every event counted exactly once across 20 SIGKILLs"
    assert duplicates == 0
    ids = _stored_event_ids(settings)
    assert len(ids) == len(set(ids)), "an event is stored twice"
    assert set(ids) == {e.event_id for e in events}
    versions = read_all(settings, settings.versions_topic)
    report = _check_registry_and_store(settings, versions)
    assert report["tmp_dirs"] == [], "temp dirs left after a clean restart"
    print(
        f"decisions published: {len(versions)}; "
        f"orphan dirs (renamed, never recorded): {report['orphan_dirs']}"
    )


# ---------------------------------------------------------------- private stacks for outages


def _private_stack(root: Path, shared: Settings) -> Settings:
    (root / "kafka").symlink_to((shared.cache_dir / "kafka").resolve())
    settings = load_settings(
        cache_dir=root,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    stack_mod.up(settings)
    return settings


@pytest.fixture(scope="module")
def private_stack(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = _private_stack(tmp_path_factory.mktemp("private-stack"), stack)
    try:
        yield settings
    finally:
        stack_mod.down(settings)


def _on(private: Settings, settings: Settings) -> Settings:
    """The per-test names of `settings` on the private stack."""
    return settings.model_copy(
        update={
            "kafka_bootstrap": private.kafka_bootstrap,
            "redis_url": private.redis_url,
            "cache_dir": private.cache_dir,
        }
    )


def _ready(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, orjson.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, orjson.loads(body or b"{}")
        except orjson.JSONDecodeError:
            return exc.code, {"body": body.decode(errors="replace")}
    except OSError as exc:
        return 0, {"error": str(exc)}


# ---------------------------------------------------------------- 2. broker outage


def test_broker_outage_of_30_s_loses_nothing(
    private_stack: Settings,
    settings: Settings,
    events: list[ClickEvent],
    procs: list[WorkerProc],
    tmp_path: Path,
) -> None:
    s = _on(private_stack, settings)
    ensure_topics(s, [s.input_topic])
    worker = WorkerProc(_env(s, **NO_TRAINING), tmp_path / "worker.log")
    procs.append(worker)
    port = int(worker.wait_for_event("metrics endpoint", 60)["port"])
    worker.wait_for_event("assigned", 60)
    half = len(events) // 2
    assert produce_events(s, events[:half], restamp=True) == half
    assert _wait_counted(s, half, 60, worker) == half

    stack_mod.stop_service(private_stack, "kafka", kill=True)
    time.sleep(8)
    during = _ready(port)
    time.sleep(22)
    assert worker.proc.poll() is None, f"worker died with the broker:\n{worker.tail()}"
    stack_mod.start_service(private_stack, "kafka")

    assert produce_events(s, events[half:], restamp=True) == len(events) - half
    assert _wait_counted(s, len(events), 120, worker) == len(events), worker.tail()
    assert worker.proc.poll() is None
    counted, duplicates = _counted(s)
    assert (counted, duplicates) == (len(events), 0)

    # The outage is visible: librdkafka's own lines on stderr, and /readyz says kafka is not ready.
    text = worker.raw().decode(errors="replace")
    rdkafka = [line for line in text.splitlines() if "rdkafka" in line or "Connection refused" in line]
    assert rdkafka, "the worker logged nothing about the broker outage"
    print(f"{len(rdkafka)} librdkafka lines, e.g. {rdkafka[0][:200]!r}; /readyz during the outage: {during}")
    assert during[0] == 503 and during[1].get("checks", during[1]).get("kafka") is False, during
    assert worker.terminate() == 0


# ---------------------------------------------------------------- 3. Redis outage


def test_redis_outage_worker_survives_and_loses_nothing(
    private_stack: Settings,
    settings: Settings,
    events: list[ClickEvent],
    procs: list[WorkerProc],
    tmp_path: Path,
) -> None:
    s = _on(private_stack, settings)
    ensure_topics(s, [s.input_topic])
    env = _env(s, **NO_TRAINING)
    log = tmp_path / "worker.log"
    worker = WorkerProc(env, log)
    procs.append(worker)
    worker.wait_for_event("assigned", 60)
    third = len(events) // 3
    assert produce_events(s, events[:third], restamp=True) == third
    assert _wait_counted(s, third, 60, worker) == third

    stack_mod.stop_service(private_stack, "redis")
    # Events keep arriving while Redis is down.
    assert produce_events(s, events[third : 2 * third], restamp=True) == third
    time.sleep(10)
    survived = worker.proc.poll() is None
    stack_mod.start_service(private_stack, "redis")
    assert produce_events(s, events[2 * third :], restamp=True) == len(events) - 2 * third

    if not survived:
        # Whatever the worker did, a restart must still count every event exactly once (offsets in Redis).
        restarted = WorkerProc(env, log)
        procs.append(restarted)
        worker = restarted
    assert _wait_counted(s, len(events), 90, worker) == len(events), worker.tail()
    assert _counted(s) == (len(events), 0)
    ids = _stored_event_ids(s)
    assert len(ids) == len(set(ids)) == len(events)
    assert survived, f"the worker exited during the Redis outage:\n{log.read_text()[-2500:]}"
    assert worker.terminate() == 0


# ---------------------------------------------------------------- 4. broken model store


def test_broken_model_store_fails_that_segment_and_ingest_goes_on(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    from worker.startup import StartupError, check_dependencies

    # The whole store unusable (under a regular file; root ignores permissions): start-up says so.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    broken = settings.model_copy(update={"model_store": blocker / "models"})
    with pytest.raises(StartupError, match="WORKER_MODEL_STORE"):
        check_dependencies(broken, redis.Redis.from_url(settings.redis_url))

    # One segment's store directory is a file: its promotions fail, everything else goes on.
    settings.model_store.mkdir(parents=True)
    (settings.model_store / segment_hash("Hampton Bay")).write_text("not a directory")
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    worker = WorkerProc(_env(settings), tmp_path / "worker.log")
    procs.append(worker)
    assert produce_events(settings, events, restamp=True) == len(events)
    failed = worker.wait_for(
        lambda r: r.get("event") == "segment run" and r.get("segment") == "Hampton Bay", 240
    )
    assert failed["decision"] == "failed" and "model store" in failed["reason"], failed
    worker.wait_for(lambda r: r.get("event") == "backing off" and r.get("segment") == "Hampton Bay", 30)
    worker.wait_for(
        lambda r: (
            r.get("event") == "segment run" and r.get("segment") == "GE" and r.get("decision") == "promoted"
        ),
        240,
    )
    extra = load_homedepot().stream()[-40:]
    assert produce_events(settings, extra, restamp=True) == len(extra)
    assert _wait_counted(settings, len(events) + len(extra), 60, worker) == len(events) + len(extra)
    assert worker.terminate() == 0

    registry = Registry.from_settings(settings)
    assert registry.champion_version("Hampton Bay") is None
    assert all(r.decision == "failed" and r.adapter is None for r in registry.versions("Hampton Bay"))
    versions = read_all(settings, settings.versions_topic)
    mine = [v for v in versions if v["segment"] == "Hampton Bay"]
    assert mine and all(v["decision"] == "failed" for v in mine)
    scores = read_all(settings, settings.scores_topic, idle_s=2)
    assert not [x for x in scores if x["segment"] == "Hampton Bay" and x["model_version"]], (
        "only the shared model's refreshed scores, never an adapter's, for the failed segment"
    )
    assert any(x["segment"] == "GE" and x["model_version"] for x in scores)
    report = _check_registry_and_store(settings, versions)
    assert report["tmp_dirs"] == []


# ---------------------------------------------------------------- 5. diverging training

_DIVERGE = """
import dataclasses
import sys
import worker.learn.train as train

_fit = train.fit
TARGET = sys.argv[1]


def fit(backbone, model, events, options, **kw):
    # A learning rate of 1e30 (over the setting's bound, so injected here) for TARGET only: the
    # parameters blow up after the first step and the next loss is not finite.
    if events and all(e.segment == TARGET for e in events):
        options = dataclasses.replace(options, lr=1e30, batch_size=4)
    return _fit(backbone, model, events, options, **kw)


train.fit = fit
from worker.cli import main

sys.exit(main(["run"]))
"""


def test_diverging_training_fails_backs_off_and_others_promote(
    settings: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    launcher = tmp_path / "diverge.py"
    launcher.write_text(_DIVERGE)
    ensure_topics(settings, [settings.input_topic, settings.versions_topic, settings.scores_topic])
    worker = WorkerProc(
        _env(settings, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        tmp_path / "worker.log",
        argv=[sys.executable, str(launcher), "GE"],
    )
    procs.append(worker)
    assert produce_events(settings, events, restamp=True) == len(events)
    first = worker.wait_for(lambda r: r.get("event") == "segment run" and r.get("segment") == "GE", 240)
    assert first["decision"] == "failed" and "NonFiniteLoss" in first["reason"], first
    # Failed runs keep their events (nothing marked trained), so GE retries: 2 s, then 4 s later.
    backoffs = []
    deadline = time.monotonic() + 60
    while len(backoffs) < 2 and time.monotonic() < deadline:
        backoffs = [
            r["seconds"]
            for r in worker.lines()
            if r.get("event") == "backing off" and r.get("segment") == "GE"
        ]
        time.sleep(0.3)
    assert backoffs[:2] == [2.0, 4.0], backoffs
    worker.wait_for(
        lambda r: (
            r.get("event") == "segment run"
            and r.get("segment") == "Hampton Bay"
            and r.get("decision") == "promoted"
        ),
        240,
    )
    assert worker.terminate() == 0

    versions = read_all(settings, settings.versions_topic)
    ge = [v for v in versions if v["segment"] == "GE" and v["scope"] == "segment"]
    assert len(ge) >= 2 and all(v["decision"] == "failed" for v in ge)
    assert Registry.from_settings(settings).champion_version("GE") is None
    scores = read_all(settings, settings.scores_topic, idle_s=2)
    assert not [x for x in scores if x["segment"] == "GE" and x["model_version"]], (
        "scores published for a failed training (the shared model's refreshed ones carry version 0)"
    )
    assert any(x["segment"] == "Hampton Bay" and x["model_version"] for x in scores)
    assert _counted(settings) == (len(events), 0)


# ---------------------------------------------------------------- 6. secured broker: SASL/PLAIN + ACLs

WORKER_USER = "worker"


@pytest.fixture(scope="module")
def secure_stack(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("secure-stack")
    (root / "kafka").symlink_to((stack.cache_dir / "kafka").resolve())
    unique = uuid.uuid4().hex[:8]
    settings = load_settings(
        cache_dir=root,
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username=WORKER_USER,
        kafka_sasl_password=f"pw-{unique}",
        group_id=f"g-{unique}",
        model_store=root / "models",
    )
    env = {**_env(settings), "WORKER_CACHE_DIR": str(root)}
    up = subprocess.run(
        [sys.executable, "-m", "worker", "stack", "up", "--secure"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    try:
        assert up.returncode == 0, up.stderr
        assert "SASL_PLAINTEXT" in up.stdout and "bindings" in up.stdout, up.stdout
        yield settings
    finally:
        stack_mod.down(settings)


def _deliver(conf: dict[str, Any], topic: str) -> str | None:
    """Produce one message; None when delivered, else the error's name."""
    errors: list[KafkaError] = []
    producer = Producer({**conf, "message.timeout.ms": 10000, "log_level": 0})
    producer.produce(topic, value=b"x", on_delivery=lambda err, msg: errors.append(err))
    producer.flush(15)
    return errors[0].name() if errors and errors[0] is not None else None


def _first_error(conf: dict[str, Any], topic: str) -> str | None:
    """Subscribe and poll a while; the first error's name, or None if none came."""
    consumer = Consumer({**conf, "group.id": conf.get("group.id", "x"), "log_level": 0})
    consumer.subscribe([topic])
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if (
                msg is not None
                and msg.error() is not None
                and msg.error().code() != KafkaError._PARTITION_EOF
            ):
                return str(msg.error().name())
            if msg is not None and msg.error() is None:
                return None
    finally:
        consumer.close()
    return None


@pytest.mark.security
def test_secured_broker_authenticates_the_worker_and_enforces_acls(
    secure_stack: Settings, events: list[ClickEvent], procs: list[WorkerProc], tmp_path: Path
) -> None:
    from worker.startup import StartupError, check_dependencies
    from worker.stream.kafka import client_config

    s = secure_stack
    admin_conf = stack_mod.secure_admin_config(s)
    assert produce_events(s.model_copy(update=_admin_update(s)), events[:60], restamp=True) == 60

    # The worker authenticates with its configured credentials and ingests.
    worker = WorkerProc(
        {**_env(s, **NO_TRAINING), "WORKER_CACHE_DIR": str(s.cache_dir)}, tmp_path / "worker.log"
    )
    procs.append(worker)
    assert _wait_counted(s, 60, 90, worker) == 60, worker.tail()
    assert worker.terminate() == 0

    # Wrong credentials: start-up fails, within the check's own timeout, naming the credentials.
    wrong = s.model_copy(update={"kafka_sasl_password": s.kafka_sasl_password.__class__("wrong")})
    started = time.monotonic()
    with pytest.raises(StartupError, match="WORKER_KAFKA_SASL") as failure:
        check_dependencies(wrong, redis.Redis.from_url(s.redis_url))
    took = time.monotonic() - started
    print(f"wrong credentials: StartupError after {took:.1f} s: {failure.value}")
    assert took < 20
    assert "wrong" not in str(failure.value)

    # ACLs: the worker user reads its input, writes its outputs, and nothing else.
    mine = {**client_config(s), "group.id": f"{s.group_id}-acl"}
    for topic in (s.scores_topic, s.versions_topic, s.dlq_topic):
        assert _deliver(mine, topic) is None, f"the worker user cannot write {topic}"
    assert _deliver(mine, s.input_topic) == "TOPIC_AUTHORIZATION_FAILED"
    assert _first_error(mine, s.input_topic) is None
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient(admin_conf)
    other = f"other-{uuid.uuid4().hex[:6]}"
    admin.create_topics([NewTopic(other, num_partitions=1, replication_factor=1)])[other].result(30)
    assert _deliver(admin_conf, other) is None
    assert _first_error(mine, other) == "TOPIC_AUTHORIZATION_FAILED"
    assert (
        _first_error({**mine, "group.id": "someone-elses-group"}, s.input_topic)
        == "GROUP_AUTHORIZATION_FAILED"
    )
    with pytest.raises(Exception, match="AUTHORIZATION"):
        as_worker = AdminClient(client_config(s))
        as_worker.create_topics([NewTopic("worker-made", 1, 1)])["worker-made"].result(30)


def _admin_update(s: Settings) -> dict[str, Any]:
    from pydantic import SecretStr

    return {
        "kafka_sasl_username": stack_mod.ADMIN_USER,
        "kafka_sasl_password": SecretStr(stack_mod.admin_password(s)),
    }
