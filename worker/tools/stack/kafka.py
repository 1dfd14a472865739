"""The local Kafka broker: its jars (resolved from Maven Central with the machine's `mvn`), a KRaft
`server.properties`, its start in a session of its own, and the health probe."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.tools.stack.endpoints import Endpoints, first_broker, stack_dir
from worker.tools.stack.processes import (
    START_TIMEOUT_S,
    PidFile,
    StackError,
    ensure_free,
    port_open,
    running_pid,
    wait_started,
)

KAFKA_VERSION = os.environ.get("WORKER_STACK_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.16"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ctr-worker</groupId>
  <artifactId>{runtime}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>{artifact}</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


def log4j2_properties(stream: str, root_level: str, *loggers: tuple[str, str, str]) -> str:
    """A log4j2 configuration: one console appender on `stream` (STDOUT or STDERR) at `root_level`, and
    `loggers` (key, logger name, level) set apart."""
    lines = ["status = warn", "appender.console.type = Console", f"appender.console.name = {stream}"]
    if stream == "STDERR":
        lines.append("appender.console.target = SYSTEM_ERR")
    lines += [
        "appender.console.layout.type = PatternLayout",
        "appender.console.layout.pattern = [%d] %p %m (%c)%n",
        f"rootLogger.level = {root_level}",
        f"rootLogger.appenderRef.{stream.lower()}.ref = {stream}",
    ]
    for key, name, level in loggers:
        lines += [f"logger.{key}.name = {name}", f"logger.{key}.level = {level}"]
    return "\n".join([*lines, ""])


BROKER_LOG4J2 = log4j2_properties(
    "STDOUT",
    "info",
    ("kafka", "kafka", "warn"),
    ("state", "state.change.logger", "warn"),
    ("server", "org.apache.kafka", "warn"),
    ("started", "kafka.server.KafkaRaftServer", "info"),
)
"""The broker logs warnings, and the line that says it started."""


def runtime_pom(runtime: str, artifact: str, version: str) -> str:
    """A pom whose runtime dependencies are `org.apache.kafka:artifact:version` and a log4j2 backend."""
    return _POM.format(
        runtime=runtime, artifact=artifact, kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION
    )


def resolve_jars(cache_dir: Path, version: str, artifact: str, prefix: str = "") -> Path:
    """Resolve `org.apache.kafka:artifact:version` with the machine's `mvn` once, into the folder
    `<prefix>libs` of the version's home; later runs reuse it. Another `prefix` keeps another artifact's
    jars apart, so a running broker's jars stay put."""
    home = (cache_dir / "kafka" / version).resolve()
    libs, stamp, pom = home / f"{prefix}libs", home / f".{prefix}resolved", home / f"{prefix}pom.xml"
    what = f"{artifact}:{version}"
    if stamp.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "`mvn` not found on PATH: install Maven (apt-get install -y maven) to fetch Kafka's jars"
        )
    home.mkdir(parents=True, exist_ok=True)
    pom.write_text(runtime_pom(f"kafka-{prefix}runtime", artifact, version))
    print(f"resolving org.apache.kafka:{what} from Maven Central into {libs} ...", file=sys.stderr)
    shutil.rmtree(libs, ignore_errors=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise StackError(f"mvn could not resolve org.apache.kafka:{what}:\n{proc.stdout[-3000:]}")
    stamp.write_text(what)
    return libs


def kafka_libs(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """The broker's jars."""
    return resolve_jars(cache_dir, version, "kafka_2.13")


def java() -> str:
    """The `java` on PATH, checked to be 17 or newer as Kafka needs."""
    found = shutil.which("java")
    if found is None:
        raise StackError(
            "`java` not found on PATH: Kafka needs Java 17+ (apt-get install -y openjdk-17-jre-headless)"
        )
    out = subprocess.run([found, "-version"], capture_output=True, text=True, check=False).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return found
    if major < 17:
        raise StackError(f"Kafka {KAFKA_VERSION} needs Java 17+, found: {out.splitlines()[0]}")
    return found


def kafka_cluster_id() -> str:
    """A random Kafka cluster id; like Kafka's own, never starting with '-' (the CLI would read an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def kafka_properties(data: Path, host: str, port: int) -> str:
    """A single KRaft node, broker and controller (on `port` + 1), PLAINTEXT on loopback."""
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


def kafka_healthy_conf(conf: Mapping[str, Any], timeout: float) -> bool:
    """The broker `conf` (librdkafka settings) names answers a metadata request; a TCP probe first keeps
    librdkafka from logging refusals."""
    from confluent_kafka.admin import AdminClient

    if not port_open(*first_broker(conf["bootstrap.servers"]), timeout=timeout):
        return False
    try:
        AdminClient({**conf, "log_level": 0}).list_topics(timeout=timeout)
    except Exception:
        return False
    return True


def kafka_healthy(bootstrap: str, timeout: float = 3.0) -> bool:
    """The PLAINTEXT broker at `bootstrap` answers a metadata request."""
    return kafka_healthy_conf({"bootstrap.servers": bootstrap}, timeout)


def kafka_files(settings: Settings) -> PidFile:
    root = stack_dir(settings) / "kafka"
    return root / "kafka.pid", (str(root / "server.properties"),)


def start_kafka(settings: Settings, ep: Endpoints) -> str:
    pid = running_pid(*kafka_files(settings))
    if pid:
        return f"already running (pid {pid})"
    bootstrap = f"{ep.kafka_host}:{ep.kafka_port}"
    properties = kafka_properties(stack_dir(settings) / "kafka" / "data", ep.kafka_host, ep.kafka_port)
    pid = launch_kafka(settings, ep, properties, lambda: kafka_healthy(bootstrap, timeout=2.0))
    return f"started (pid {pid})"


def launch_kafka(settings: Settings, ep: Endpoints, properties: str, healthy: Callable[[], bool]) -> int:
    """Write `properties`, format storage on first start, start the broker in its own session and wait
    until `healthy()`; fails with the tail of the broker's log. Returns the broker's pid."""
    for port in (ep.kafka_port, ep.kafka_port + 1):  # client and controller listeners
        ensure_free(ep.kafka_host, port, "Kafka", "WORKER_KAFKA_BOOTSTRAP")
    root = stack_dir(settings) / "kafka"
    config = root / "server.properties"
    data = root / "data"
    libs = kafka_libs(settings.cache_dir)
    java_bin = java()
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(properties)
    os.chmod(config, 0o600)
    (root / "log4j2.properties").write_text(BROKER_LOG4J2)
    classpath = f"{libs}/*"
    log4j = f"-Dlog4j2.configurationFile={root / 'log4j2.properties'}"
    if not (data / "meta.properties").exists():
        fmt = subprocess.run(
            [
                java_bin,
                log4j,
                "-cp",
                classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                kafka_cluster_id(),
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
                java_bin,
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
    (root / "kafka.pid").write_text(str(proc.pid))
    wait_started(
        proc,
        healthy,
        0.5,
        log,
        lambda code: f"Kafka exited with code {code}; last lines of {log}",
        f"Kafka did not answer a metadata request within {START_TIMEOUT_S:.0f} s; last lines of {log}",
    )
    return proc.pid
