"""Security properties, against the real Redis and Kafka where they matter.

- Redis ACLs: the worker works as a password-protected ACL user confined to its key prefix, refuses to start
  with a wrong password, names WORKER_REDIS_URL, and never prints the password.
- Secrets never reach output: `python -m worker run` / `ingest` as subprocesses, stdout and stderr grepped.
- Segment names never reach a Redis key or a filesystem path unescaped.
- Adapters load only from safetensors: no pickle anywhere in the worker, a pickle adapter is refused.
- The metrics and health endpoint binds to loopback by default.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import orjson
import pytest
import redis
from ingest_helpers import event_doc, ingest_all, produce_docs, produce_raw
from pydantic import ValidationError
from registry_helpers import version_record

from worker.config import ConfigError, Settings, load_settings
from worker.events import HoldoutMetrics
from worker.startup import StartupError, check_dependencies
from worker.state.buffer import Buffer, PartitionWrite, Pending
from worker.state.entry import pair_key
from worker.state.registry import Registry
from worker.stream.kafka import ensure_topics

pytestmark = pytest.mark.security

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "worker"

HOSTILE = [
    "../../etc/passwd",
    "a/../../b",
    "*",
    "{x}",
    "seg:{0}:offsets",
    "/abs/path",
    "..",
    "C:\\Windows\\system32",
    "a\u2215b",  # DIVISION SLASH
    "%2e%2e%2f",
    "x" * 10_240,
]


def _with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _redis_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The subprocess's environment: this test's topics, group and prefix; no inherited WORKER_* values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(
        {
            "WORKER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "WORKER_REDIS_URL": settings.redis_url,
            "WORKER_INPUT_TOPIC": settings.input_topic,
            "WORKER_DLQ_TOPIC": settings.dlq_topic,
            "WORKER_SCORES_TOPIC": settings.scores_topic,
            "WORKER_VERSIONS_TOPIC": settings.versions_topic,
            "WORKER_REQUESTS_TOPIC": settings.requests_topic,
            "WORKER_GROUP_ID": settings.group_id,
            "WORKER_REDIS_PREFIX": settings.redis_prefix,
            "WORKER_MODEL_STORE": str(settings.model_store),
            "WORKER_CACHE_DIR": str(Path(settings.model_store).parent / "cache"),
        }
    )
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------ Redis ACL


@pytest.fixture
def acl_user(settings: Settings) -> Iterator[tuple[str, str]]:
    """A Redis ACL user with a password, confined to the test's key prefix; deleted afterwards."""
    admin = redis.Redis.from_url(settings.redis_url)
    user, password = f"u-{uuid.uuid4().hex[:10]}", f"pw-{uuid.uuid4().hex}"
    admin.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", f"~{settings.redis_prefix}:*", "+@all"
    )
    try:
        yield user, password
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        Buffer(settings, admin).purge()


@pytest.mark.integration
def test_acl_user_with_the_right_password_passes_the_startup_check(
    settings: Settings, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    s = settings.model_copy(update={"redis_url": _with_credentials(settings.redis_url, user, password)})
    client = redis.Redis.from_url(s.redis_url, socket_timeout=10)
    check_dependencies(s, client)
    assert client.acl_whoami() == user


@pytest.mark.integration
def test_buffer_and_registry_work_confined_to_the_prefix(
    settings: Settings, acl_user: tuple[str, str]
) -> None:
    """The ACL user may touch only `<prefix>:*`: every key the worker writes is under its prefix."""
    user, password = acl_user
    s = settings.model_copy(update={"redis_url": _with_credentials(settings.redis_url, user, password)})
    client: redis.Redis[bytes] = redis.Redis.from_url(s.redis_url, socket_timeout=10)
    buffer = Buffer(s, client)
    events = [
        Pending(i, name, f"e{i}", i % 2, pair_key("q", "i"), orjson.dumps(event_doc(i, name)))
        for i, name in enumerate(HOSTILE)
    ]
    result = buffer.write([PartitionWrite(s.input_topic, 0, len(events), events, [(len(events), "schema")])])
    assert (result.added, result.dead) == (len(HOSTILE), 1)
    assert buffer.segments(0) == sorted(HOSTILE)
    reg = Registry(client, s.model_store, s.redis_prefix)
    for name in HOSTILE[:3]:
        assert reg.next_version(name) == 1
        assert reg.shared().next_version(name) == 1
    assert sorted(reg.segments()) == sorted(HOSTILE[:3])
    # And the confinement is real: outside the prefix the user is refused.
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set(f"not-{s.redis_prefix}:x", b"1")


@pytest.mark.integration
def test_wrong_redis_password_is_a_clear_startup_error_without_the_password(
    settings: Settings, acl_user: tuple[str, str]
) -> None:
    user, password = acl_user
    wrong = f"wrong-{uuid.uuid4().hex}"
    s = settings.model_copy(update={"redis_url": _with_credentials(settings.redis_url, user, wrong)})
    with pytest.raises(StartupError) as caught:
        check_dependencies(s, redis.Redis.from_url(s.redis_url, socket_timeout=10))
    message = str(caught.value)
    assert "WORKER_REDIS_URL" in message
    assert "credentials" in message or "auth" in message.lower()
    assert wrong not in message and password not in message
    assert wrong not in repr(caught.value)


# ------------------------------------------------------------------------------------------ secrets in output


@pytest.mark.integration
def test_worker_run_with_a_wrong_redis_password_exits_quickly_and_prints_no_secret(
    settings: Settings, acl_user: tuple[str, str]
) -> None:
    user, _ = acl_user
    redis_secret = f"redis-secret-{uuid.uuid4().hex}"
    sasl_secret = f"sasl-secret-{uuid.uuid4().hex}"
    env = _redis_env(
        settings,
        WORKER_REDIS_URL=_with_credentials(settings.redis_url, user, redis_secret),
        WORKER_KAFKA_SASL_PASSWORD=sasl_secret,
        WORKER_LOG_LEVEL="DEBUG",
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    elapsed = time.monotonic() - started
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, (out, err)
    assert elapsed < 60, f"took {elapsed:.1f} s to fail"
    assert "WORKER_REDIS_URL" in err, err
    for secret in (redis_secret, sasl_secret):
        assert secret not in out and secret not in err, f"secret leaked:\n{out}\n{err}"
        assert secret.encode() not in proc.stdout + proc.stderr


@pytest.mark.integration
def test_ingest_at_debug_level_never_logs_the_sasl_password(settings: Settings) -> None:
    sasl_secret = f"sasl-secret-{uuid.uuid4().hex}"
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=2)
    produce_docs(settings, [event_doc(i, f"seg-{i % 3}") for i in range(20)])
    produce_raw(settings, [(b"k", b"not json")])
    env = _redis_env(
        settings,
        WORKER_KAFKA_SASL_USERNAME="someone",
        WORKER_KAFKA_SASL_PASSWORD=sasl_secret,
        WORKER_LOG_LEVEL="DEBUG",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "ingest", "--idle-exit", "3"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-3000:]
    assert '"dead_letter"' in err and '"closed"' in err  # it did log, at length
    assert sasl_secret not in out and sasl_secret not in err
    Buffer(settings).purge()


def test_settings_repr_and_dump_hide_the_sasl_password(clean_env: pytest.MonkeyPatch) -> None:
    secret = f"sasl-secret-{uuid.uuid4().hex}"
    clean_env.setenv("WORKER_KAFKA_SASL_PASSWORD", secret)
    s = load_settings()
    assert s.kafka_sasl_password.get_secret_value() == secret
    for shown in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
        assert secret not in shown


def test_invalid_sasl_settings_error_hides_the_password(clean_env: pytest.MonkeyPatch) -> None:
    secret = f"sasl-secret-{uuid.uuid4().hex}"
    clean_env.setenv("WORKER_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")  # without a user name: invalid
    clean_env.setenv("WORKER_KAFKA_SASL_PASSWORD", secret)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert secret not in str(caught.value)


def test_invalid_redis_url_error_hides_the_password(clean_env: pytest.MonkeyPatch) -> None:
    secret = f"redis-secret-{uuid.uuid4().hex}"
    clean_env.setenv("WORKER_REDIS_URL", f"http://user:{secret}@127.0.0.1:6379/0")  # wrong scheme
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "WORKER_REDIS_URL" in str(caught.value)
    assert secret not in str(caught.value)


def _delimited_secret() -> tuple[str, list[str]]:
    """A password with every URL delimiter in it, and its random pieces: no piece may leak, not just all."""
    pieces = [uuid.uuid4().hex[:12] for _ in range(5)]
    return "{}/{}@{}:{}%{}".format(*pieces), pieces


def _assert_hidden(shown: str, secret: str, pieces: list[str]) -> None:
    for form in (secret, quote(secret, safe=""), *pieces):
        assert form not in shown, shown


@pytest.mark.parametrize("encode", [False, True])
@pytest.mark.parametrize(
    "template",
    [
        "redis://worker:{}@127.0.0.1:6379/0",
        "rediss://:{}@redis.example:6380",
        "redis+cluster://worker:{}@a:1,b:2",
    ],
)
def test_settings_repr_hides_a_redis_password_with_url_delimiters(
    clean_env: pytest.MonkeyPatch, template: str, encode: bool
) -> None:
    secret, pieces = _delimited_secret()
    url = template.format(quote(secret, safe="") if encode else secret)
    s = Settings(redis_url=url)
    assert s.redis_url == url
    for shown in (repr(s), str(s), f"{s!r}", repr(s.model_copy())):
        _assert_hidden(shown, secret, pieces)
        assert "***@" in shown


@pytest.mark.parametrize(
    "template",
    [
        "http://worker:{}@127.0.0.1:6379/0",
        "redis+cluster://worker:{}@a:1,b:2/3",
        "redis+cluster://w:{}@a:1,b",
    ],
)
def test_invalid_redis_url_hides_a_password_with_url_delimiters(
    clean_env: pytest.MonkeyPatch, template: str
) -> None:
    secret, pieces = _delimited_secret()
    url = template.format(secret)
    with pytest.raises(ValidationError) as raw:
        Settings(redis_url=url)
    _assert_hidden(str(raw.value), secret, pieces)
    _assert_hidden(repr(raw.value), secret, pieces)
    clean_env.setenv("WORKER_REDIS_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "WORKER_REDIS_URL" in str(caught.value)
    _assert_hidden(str(caught.value), secret, pieces)


def test_redact_url_cuts_the_userinfo_at_the_last_at_sign() -> None:
    from worker.config import redact_url

    secret, _ = _delimited_secret()
    assert redact_url(f"redis://worker:{secret}@10.0.0.1:6379/2") == "redis://worker:***@10.0.0.1:6379/2"
    assert redact_url(f"rediss://:{secret}@h:6380") == "rediss://:***@h:6380"
    assert redact_url(f"redis+cluster://w:{secret}@a:1,b:2") == "redis+cluster://w:***@a:1,b:2"
    for url in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock?db=1", "redis://worker@h:1/0"):
        assert redact_url(url) == url


# ------------------------------------------------------------------------------------------ segment names

_KEY = re.compile(
    r"^(?P<prefix>[A-Za-z0-9_-]+)(?::shared)?:("
    r"\{[A-Za-z0-9._-]+-[0-9]+\}:(offsets|dedup|stats|segs|active|seg:[0-9a-f]{32}:(meta|new|sample|cand|candz))"
    r"|reg:(index|\{[0-9a-f]{32}\}:(next|name|records|champion|moves|published))"
    r")$"
)


@pytest.mark.integration
def test_segment_names_never_reach_a_redis_key_or_a_path_unescaped(settings: Settings) -> None:
    ensure_topics(settings, [settings.input_topic, settings.dlq_topic], partitions=3)
    produce_docs(settings, [event_doc(i, name) for i, name in enumerate(HOSTILE * 2)])
    buffer = ingest_all(settings).buffer
    try:
        stored = sorted(n for p in range(3) for n in buffer.segments(p))
        assert stored == sorted(HOSTILE)

        reg = Registry.from_settings(settings, buffer.redis)
        store = settings.model_store.resolve()
        for name in HOSTILE:
            for r in (reg, reg.shared()):
                version = r.next_version(name)
                path = r.adapter_dir(name, version)
                path.mkdir(parents=True)
                (path / "adapter_model.safetensors").write_bytes(b"x")
                r.record(
                    version_record(
                        name, version, str(path), challenger=HoldoutMetrics(auc=0.7, logloss=0.6, n=2)
                    )
                )
                resolved = path.resolve()
                assert resolved.is_relative_to(store), (name[:40], resolved)
                assert all(
                    re.fullmatch(r"[0-9a-f]{32}|[0-9]{8}|shared", part)
                    for part in resolved.relative_to(store).parts
                ), resolved
        assert sorted(reg.segments()) == sorted(HOSTILE)
        assert sorted(reg.shared().segments()) == sorted(HOSTILE)

        # Nothing was written outside the store, and the store holds only hashed names.
        for found in store.rglob("*"):
            assert all(
                re.fullmatch(r"[0-9a-f]{32}|[0-9]{8}|shared|adapter_model\.safetensors", part)
                for part in found.relative_to(store).parts
            ), found

        keys = [k.decode() for k in buffer.redis.scan_iter(match=f"{settings.redis_prefix}:*", count=1000)]
        assert len(keys) > 20
        for key in keys:
            assert _KEY.fullmatch(key), key[:200]
            assert key.split(":", 1)[0] == settings.redis_prefix
            for name in HOSTILE:
                assert name not in key, (name[:40], key[:200])
    finally:
        buffer.purge()


# ------------------------------------------------------------------------------------------ model loading


def test_worker_source_has_no_pickle_loading() -> None:
    offenders = []
    for path in sorted(WORKER.glob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(|\bpickle\b|\bdill\b|joblib\.load|weights_only\s*=\s*False", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders


class _Boom:
    """A pickle payload that touches a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def _adapter_config(directory: Path) -> None:
    (directory / "adapter_config.json").write_text(
        orjson.dumps({"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}).decode()
    )


def test_a_pickle_adapter_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    from worker.learn.store import load_adapter

    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"calibration": _Boom(marker)})

    only_bin = tmp_path / "only-bin"
    only_bin.mkdir()
    _adapter_config(only_bin)
    (only_bin / "adapter_model.bin").write_bytes(payload)
    (only_bin / "head.bin").write_bytes(payload)
    with pytest.raises((FileNotFoundError, OSError)):
        load_adapter(only_bin)

    disguised = tmp_path / "disguised"
    disguised.mkdir()
    _adapter_config(disguised)
    (disguised / "adapter_model.safetensors").write_bytes(payload)
    (disguised / "head.safetensors").write_bytes(payload)
    with pytest.raises(Exception) as caught:
        load_adapter(disguised)
    assert not isinstance(caught.value, AssertionError)

    assert not marker.exists(), "a pickle was executed"


# ------------------------------------------------------------------------------------------ metrics endpoint


def test_metrics_endpoint_binds_to_loopback_by_default(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().metrics_host == "127.0.0.1"
    assert Settings.model_fields["metrics_host"].default == "127.0.0.1"
