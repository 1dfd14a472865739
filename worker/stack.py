"""The local stack for demo, tests and benchmarks: a real Kafka (KRaft, jars from Maven Central) and Redis.

Both run as child processes in their own sessions, on loopback, with their data under the cache directory.
`down` stops exactly what `up` started: it reads the pid files and checks each pid's command line first.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from worker.config import Settings, load_settings

KAFKA_VERSION = os.environ.get("WORKER_STACK_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.16"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
START_TIMEOUT_S = 60.0

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ctr-worker</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = warn
logger.state.name = state.change.logger
logger.state.level = warn
logger.server.name = org.apache.kafka
logger.server.level = warn
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
"""


class StackError(RuntimeError):
    """A service of the local stack could not be prepared or started; the message says what to do."""


@dataclass(frozen=True)
class Endpoints:
    kafka_host: str
    kafka_port: int
    redis_host: str
    redis_port: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Endpoints:
        first = settings.kafka_bootstrap.split(",")[0].strip()
        khost, _, kport = first.rpartition(":")
        url = urlparse(settings.redis_url)
        return cls(khost.strip("[]"), int(kport), url.hostname or "127.0.0.1", url.port or 6379)

    @property
    def kafka_local(self) -> bool:
        return self.kafka_host in LOOPBACK

    @property
    def redis_local(self) -> bool:
        return self.redis_host in LOOPBACK


def stack_dir(settings: Settings) -> Path:
    return (settings.cache_dir / "stack").resolve()


def _pid_alive(pid: int, *markers: str) -> bool:
    """True when `pid` runs and its command line contains one of `markers`: a recycled pid is not ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if not any(m in cmdline for m in markers):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- Kafka


def kafka_libs(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Resolve the broker's jars with the machine's `mvn` once; later runs reuse the folder."""
    home = (cache_dir / "kafka" / version).resolve()
    libs = home / "libs"
    stamp = home / ".resolved"
    if stamp.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "`mvn` not found on PATH: install Maven (apt-get install -y maven) to fetch Kafka's jars"
        )
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION))
    print(f"resolving Apache Kafka {version} from Maven Central into {libs} ...", file=sys.stderr)
    shutil.rmtree(libs, ignore_errors=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(home / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise StackError(
            f"mvn could not resolve org.apache.kafka:kafka_2.13:{version}:\n{proc.stdout[-3000:]}"
        )
    stamp.write_text(version)
    return libs


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "`java` not found on PATH: Kafka needs Java 17+ (apt-get install -y openjdk-17-jre-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return java
    if major < 17:
        raise StackError(f"Kafka {KAFKA_VERSION} needs Java 17+, found: {out.splitlines()[0]}")
    return java


def _kafka_properties(data: Path, host: str, port: int) -> str:
    controller = port + 1
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@{host}:{controller}",
            f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller}",
            f"advertised.listeners=PLAINTEXT://{host}:{port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=6",
            "auto.create.topics.enable=true",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "message.max.bytes=1048588",
            "",
        ]
    )


def kafka_healthy(bootstrap: str, timeout: float = 3.0) -> bool:
    """The broker answers a metadata request (a TCP probe first keeps librdkafka from logging refusals)."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError:
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    try:
        admin.list_topics(timeout=timeout)
    except Exception:
        return False
    return True


def start_kafka(settings: Settings, ep: Endpoints) -> str:
    root = stack_dir(settings) / "kafka"
    pidfile = root / "kafka.pid"
    config = root / "server.properties"
    marker = str(config)
    pid = _read_pid(pidfile)
    if pid and _pid_alive(pid, marker):
        return f"already running (pid {pid})"
    libs = kafka_libs(settings.cache_dir)
    java = _java()
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(_kafka_properties(data, ep.kafka_host, ep.kafka_port))
    (root / "log4j2.properties").write_text(_LOG4J2)
    classpath = f"{libs}/*"
    log4j = f"-Dlog4j2.configurationFile={root / 'log4j2.properties'}"
    if not (data / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            [
                java,
                log4j,
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                cluster_id,
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{fmt.stdout}\n{fmt.stderr}")
    log = root / "kafka.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                java,
                "-Xms256m",
                "-Xmx768m",
                "-XX:+UseG1GC",
                "-Djava.awt.headless=true",
                log4j,
                f"-Dkafka.logs.dir={root}",
                "-cp",
                classpath,
                "kafka.Kafka",
                str(config),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    pidfile.write_text(str(proc.pid))
    bootstrap = f"{ep.kafka_host}:{ep.kafka_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"Kafka exited with code {proc.returncode}; last lines of {log}:\n{_tail(log)}")
        if kafka_healthy(bootstrap, timeout=2.0):
            return f"started (pid {proc.pid})"
        time.sleep(0.5)
    raise StackError(
        f"Kafka did not answer a metadata request within {START_TIMEOUT_S:.0f} s; "
        f"last lines of {log}:\n{_tail(log)}"
    )


# ---------------------------------------------------------------- Redis


def _redis_markers(root: Path, ep: Endpoints) -> tuple[str, str]:
    """redis-server rewrites its command line to `host:port` once up; before that it shows its config."""
    return str(root / "redis.conf"), f"{ep.redis_host}:{ep.redis_port}"


def redis_healthy(url: str, timeout: float = 2.0) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


def start_redis(settings: Settings, ep: Endpoints) -> str:
    root = stack_dir(settings) / "redis"
    pidfile = root / "redis.pid"
    conf = root / "redis.conf"
    markers = _redis_markers(root, ep)
    pid = _read_pid(pidfile)
    if pid and _pid_alive(pid, *markers):
        return f"already running (pid {pid})"
    server = shutil.which("redis-server")
    if server is None:
        raise StackError(
            "`redis-server` not found on PATH: install it with `sudo apt-get install -y redis-server`"
        )
    root.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "\n".join(
            [
                f"bind {ep.redis_host}",
                f"port {ep.redis_port}",
                f"dir {root}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                "daemonize no",
                "protected-mode yes",
                f"logfile {root / 'redis.log'}",
                "",
            ]
        )
    )
    proc = subprocess.Popen(
        [server, str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    url = f"redis://{ep.redis_host}:{ep.redis_port}/0"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"redis-server exited with code {proc.returncode}:\n{_tail(root / 'redis.log')}")
        if redis_healthy(url, timeout=1.0):
            return f"started (pid {proc.pid})"
        time.sleep(0.2)
    raise StackError(
        f"Redis did not answer PING within {START_TIMEOUT_S:.0f} s:\n{_tail(root / 'redis.log')}"
    )


# ---------------------------------------------------------------- up / down / status


def up(settings: Settings) -> dict[str, str]:
    ep = Endpoints.from_settings(settings)
    result = {}
    result["redis"] = start_redis(settings, ep) if ep.redis_local else "external, not started"
    result["kafka"] = start_kafka(settings, ep) if ep.kafka_local else "external, not started"
    return result


def _stop(pidfile: Path, markers: tuple[str, ...], grace_s: float = 30.0) -> str:
    pid = _read_pid(pidfile)
    if pid is None:
        return "not running"
    if not _pid_alive(pid, *markers):
        pidfile.unlink(missing_ok=True)
        return "not running (stale pid file removed)"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pid_alive(pid, *markers):
        time.sleep(0.2)
    if _pid_alive(pid, *markers):
        os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid, *markers):
            time.sleep(0.1)
    pidfile.unlink(missing_ok=True)
    return f"stopped (pid {pid})"


def down(settings: Settings) -> dict[str, str]:
    ep = Endpoints.from_settings(settings)
    root = stack_dir(settings)
    return {
        "kafka": _stop(root / "kafka" / "kafka.pid", (str(root / "kafka" / "server.properties"),)),
        "redis": _stop(root / "redis" / "redis.pid", _redis_markers(root / "redis", ep)),
    }


def status(settings: Settings) -> dict[str, dict[str, object]]:
    return {
        "kafka": {"endpoint": settings.kafka_bootstrap, "healthy": kafka_healthy(settings.kafka_bootstrap)},
        "redis": {"endpoint": settings.redis_url, "healthy": redis_healthy(settings.redis_url)},
    }


def started_pids(settings: Settings) -> list[int]:
    """The pids `up` recorded that are still ours and alive (used by tests to prove `down` cleans up)."""
    ep = Endpoints.from_settings(settings)
    root = stack_dir(settings)
    pids = []
    for pidfile, markers in (
        (root / "kafka" / "kafka.pid", (str(root / "kafka" / "server.properties"),)),
        (root / "redis" / "redis.pid", _redis_markers(root / "redis", ep)),
    ):
        pid = _read_pid(pidfile)
        if pid and _pid_alive(pid, *markers):
            pids.append(pid)
    return pids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["up", "down", "status"])


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action == "up":
        try:
            started = up(settings)
        except StackError as exc:
            print(f"stack up failed: {exc}", file=sys.stderr)
            return 1
        for name, what in started.items():
            print(f"{name}: {what}")
        return 0
    if args.action == "down":
        for name, what in down(settings).items():
            print(f"{name}: {what}")
        return 0
    report = status(settings)
    for name, info in report.items():
        state = "healthy" if info["healthy"] else "DOWN"
        print(f"{name}: {info['endpoint']} {state}")
    return 0 if all(info["healthy"] for info in report.values()) else 1
