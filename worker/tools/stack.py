"""The local stack for demo, tests and benchmarks: a real Kafka (KRaft, jars from Maven Central) and Redis,
or a 3-master Redis Cluster when `WORKER_REDIS_URL` is a `redis+cluster://` URL (`up --redis-cluster`).

Everything runs as child processes in their own sessions, on loopback, with data under the cache directory.
`down` stops exactly what `up` started: it reads the pid files and checks each pid's command line first.
`kafka-tool` runs Kafka's own command-line tools (`kafka-consumer-groups` and friends) from the same Maven
jars, against `WORKER_KAFKA_BOOTSTRAP`.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from worker.config import Settings, load_settings, redis_cluster_nodes

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

_TOOLS_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.ctr-worker</groupId>
  <artifactId>kafka-tools-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

KAFKA_TOOLS = {
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "acls": "org.apache.kafka.tools.AclCommand",
}
"""`stack kafka-tool NAME`: the main class of Kafka's `kafka-NAME.sh` script (Kafka 4.x)."""

_TOOLS_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDERR
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = STDERR
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
        nodes = redis_cluster_nodes(settings.redis_url)
        if nodes is not None:
            return cls(khost.strip("[]"), int(kport), nodes[0][0], nodes[0][1])
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
    """True when `pid` runs and its command line contains one of `markers`, or its working directory is
    one of them: a recycled pid is not ours."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = ""
    if not any(m in cmdline or m == cwd for m in markers):
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


def _ensure_free(host: str, port: int, service: str, setting: str) -> None:
    """Refuse to start on a port something else holds: the new server would fail to bind while the
    other one answered the health probe, and `up` would report a start that did not happen."""
    try:
        socket.create_connection((host.strip("[]"), port), timeout=1.0).close()
    except OSError:
        return
    raise StackError(
        f"{host}:{port} is already in use by a process this stack did not start, so {service} cannot "
        f"start there: stop it, or set {setting} to a free port"
    )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- Kafka


def kafka_libs(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Resolve the broker's jars with the machine's `mvn` once; later runs reuse the folder."""
    home = (cache_dir / "kafka" / version).resolve()
    pom = _POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION)
    return _mvn_resolve(home, "pom.xml", pom, home / "libs", home / ".resolved", f"kafka_2.13:{version}")


def kafka_tools_libs(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Kafka's command-line tools (`org.apache.kafka:kafka-tools`, what `kafka-consumer-groups.sh` runs),
    resolved like the broker's jars but into a folder of their own, so a running broker's jars stay put."""
    home = (cache_dir / "kafka" / version).resolve()
    pom = _TOOLS_POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION)
    return _mvn_resolve(
        home, "tools-pom.xml", pom, home / "tools-libs", home / ".tools-resolved", f"kafka-tools:{version}"
    )


def _mvn_resolve(home: Path, pom_name: str, pom: str, libs: Path, stamp: Path, what: str) -> Path:
    if stamp.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "`mvn` not found on PATH: install Maven (apt-get install -y maven) to fetch Kafka's jars"
        )
    home.mkdir(parents=True, exist_ok=True)
    (home / pom_name).write_text(pom)
    print(f"resolving org.apache.kafka:{what} from Maven Central into {libs} ...", file=sys.stderr)
    shutil.rmtree(libs, ignore_errors=True)
    proc = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(home / pom_name),
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


def kafka_tool_command(settings: Settings, tool: str, args: list[str]) -> list[str]:
    """The `java ...` command line of Kafka's `kafka-<tool>.sh`, with `--bootstrap-server` set to
    WORKER_KAFKA_BOOTSTRAP unless `args` name one (or `--bootstrap-controller`)."""
    if tool not in KAFKA_TOOLS:
        raise StackError(f"unknown Kafka tool {tool!r}: one of {', '.join(sorted(KAFKA_TOOLS))}")
    libs = kafka_libs(settings.cache_dir)
    tools = kafka_tools_libs(settings.cache_dir)
    log4j = tools.parent / "tools-log4j2.properties"
    log4j.write_text(_TOOLS_LOG4J2)
    given = {a.split("=", 1)[0] for a in args}
    connect = (
        []
        if given & {"--bootstrap-server", "--bootstrap-controller"}
        else [
            "--bootstrap-server",
            settings.kafka_bootstrap,
        ]
    )
    return [
        _java(),
        "-Xmx256m",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{tools}/*:{libs}/*",
        KAFKA_TOOLS[tool],
        *connect,
        *args,
    ]


def run_kafka_tool(settings: Settings, tool: str, args: list[str]) -> int:
    """`stack kafka-tool TOOL ARGS...`: runs the tool in the foreground; its output is the tool's own."""
    return subprocess.run(kafka_tool_command(settings, tool, args), check=False).returncode


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


def _cluster_id() -> str:
    """A random Kafka cluster id; like Kafka's own, never starting with '-' (the CLI would read an option)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


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
    pid = _read_pid(root / "kafka.pid")
    if pid and _pid_alive(pid, str(root / "server.properties")):
        return f"already running (pid {pid})"
    bootstrap = f"{ep.kafka_host}:{ep.kafka_port}"
    properties = _kafka_properties(root / "data", ep.kafka_host, ep.kafka_port)
    pid = _launch_kafka(settings, ep, properties, lambda: kafka_healthy(bootstrap, timeout=2.0))
    return f"started (pid {pid})"


def _launch_kafka(settings: Settings, ep: Endpoints, properties: str, healthy: Callable[[], bool]) -> int:
    """Write `properties`, format storage on first start, start the broker in its own session and wait
    until `healthy()`; fails with the tail of the broker's log. Returns the broker's pid."""
    for port in (ep.kafka_port, ep.kafka_port + 1):  # client and controller listeners
        _ensure_free(ep.kafka_host, port, "Kafka", "WORKER_KAFKA_BOOTSTRAP")
    root = stack_dir(settings) / "kafka"
    config = root / "server.properties"
    data = root / "data"
    libs = kafka_libs(settings.cache_dir)
    java = _java()
    root.mkdir(parents=True, exist_ok=True)
    config.write_text(properties)
    os.chmod(config, 0o600)
    (root / "log4j2.properties").write_text(_LOG4J2)
    classpath = f"{libs}/*"
    log4j = f"-Dlog4j2.configurationFile={root / 'log4j2.properties'}"
    if not (data / "meta.properties").exists():
        cluster_id = _cluster_id()
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
    (root / "kafka.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"Kafka exited with code {proc.returncode}; last lines of {log}:\n{_tail(log)}")
        if healthy():
            return proc.pid
        time.sleep(0.5)
    raise StackError(
        f"Kafka did not answer a metadata request within {START_TIMEOUT_S:.0f} s; "
        f"last lines of {log}:\n{_tail(log)}"
    )


# ---------------------------------------------------------------- Redis


def _redis_markers(root: Path, ep: Endpoints) -> tuple[str, str, str]:
    """redis-server rewrites its command line to `host:port` once up; before that it shows its config.
    Its working directory is `root` (its `dir`) either way, so `down` finds it under other settings too."""
    return _node_markers(root, ep.redis_host, ep.redis_port)


def _node_markers(root: Path, host: str, port: int) -> tuple[str, str, str]:
    return str(root / "redis.conf"), f"{host}:{port}", str(root)


def redis_healthy(url: str, timeout: float = 2.0) -> bool:
    import redis

    from worker.state.client import connect

    try:
        return bool(connect(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except redis.RedisError:
        return False


def start_redis(settings: Settings, ep: Endpoints) -> str:
    return _start_redis_server(stack_dir(settings) / "redis", ep.redis_host, ep.redis_port, [])


def _start_redis_server(root: Path, host: str, port: int, extra: list[str], bus: bool = False) -> str:
    """One `redis-server` with its config, data and log under `root`, in its own session; waits for PING.
    `bus`: a cluster node, which also listens on port + 10000."""
    pidfile = root / "redis.pid"
    conf = root / "redis.conf"
    markers = _node_markers(root, host, port)
    pid = _read_pid(pidfile)
    if pid and _pid_alive(pid, *markers):
        if _pid_alive(pid, f"{host}:{port}"):
            return f"already running (pid {pid})"
        raise StackError(
            f"this stack's Redis (pid {pid}) runs with other settings, not on "
            f"{host}:{port}: stop it first with `python -m worker stack down`"
        )
    _ensure_free(host, port, "Redis", "WORKER_REDIS_URL")
    if bus:
        _ensure_free(host, port + 10000, "the Redis Cluster bus", "WORKER_REDIS_URL")
    server = shutil.which("redis-server")
    if server is None:
        raise StackError(
            "`redis-server` not found on PATH: install it with `sudo apt-get install -y redis-server`"
        )
    root.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        "\n".join(
            [
                f"bind {host}",
                f"port {port}",
                f"dir {root}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',
                "daemonize no",
                "protected-mode yes",
                f"logfile {root / 'redis.log'}",
                *extra,
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
    url = f"redis://{host}:{port}/0"
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


# ---------------------------------------------------------------- Redis Cluster

CLUSTER_MASTERS = 3


def cluster_root(settings: Settings) -> Path:
    return stack_dir(settings) / "redis-cluster"


def cluster_nodes(settings: Settings) -> list[tuple[str, int]]:
    """The local cluster's masters: the port of WORKER_REDIS_URL and the next two (each also uses its
    port + 10000 for the cluster bus)."""
    nodes = redis_cluster_nodes(settings.redis_url)
    if nodes is None:
        raise StackError(
            "--redis-cluster needs a cluster URL: set WORKER_REDIS_URL=redis+cluster://127.0.0.1:7000 "
            f"(masters on 7000, 7001 and 7002), got {settings.redis_url.split('://', 1)[0]}://..."
        )
    host, port = nodes[0]
    if host not in LOOPBACK:
        raise StackError(f"WORKER_REDIS_URL names {host}: the local stack starts Redis on loopback only")
    if port + CLUSTER_MASTERS - 1 + 10000 > 65535:
        raise StackError(f"WORKER_REDIS_URL port {port} leaves no room for the cluster bus (port + 10000)")
    return [(host, port + i) for i in range(CLUSTER_MASTERS)]


def _cluster_info(host: str, port: int) -> dict[str, str]:
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2)
    try:
        raw = client.execute_command("CLUSTER INFO")
    finally:
        client.close()
    if isinstance(raw, dict):  # redis-py parses CLUSTER INFO into a dict
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def start_redis_cluster(settings: Settings) -> str:
    """Three `redis-server`s in cluster mode (no replicas), joined by `redis-cli --cluster create` on the
    first start; a restart reuses each node's `nodes.conf`. Waits until each node says `cluster_state:ok`."""
    nodes = cluster_nodes(settings)
    root = cluster_root(settings)
    started = []
    for host, port in nodes:
        what = _start_redis_server(
            root / str(port),
            host,
            port,
            ["cluster-enabled yes", "cluster-config-file nodes.conf", "cluster-node-timeout 5000"],
            bus=True,
        )
        started.append(what)
    info = _cluster_info(*nodes[0])
    if info.get("cluster_slots_assigned") == "0" and info.get("cluster_known_nodes") == "1":
        cli = shutil.which("redis-cli")
        if cli is None:
            raise StackError("`redis-cli` not found on PATH: it comes with `apt-get install -y redis-server`")
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"{h}:{p}" for h, p in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if create.returncode != 0:
            raise StackError(
                f"redis-cli --cluster create failed:\n{create.stdout[-2000:]}{create.stderr[-2000:]}"
            )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        infos = [_cluster_info(h, p) for h, p in nodes]
        if all(
            i.get("cluster_state") == "ok" and i.get("cluster_known_nodes") == str(len(nodes)) for i in infos
        ):
            ports = ",".join(str(p) for _, p in nodes)
            return f"{len(nodes)} masters on {nodes[0][0]}:{ports}, cluster_state ok ({'; '.join(started)})"
        time.sleep(0.2)
    raise StackError(f"the Redis Cluster did not reach cluster_state:ok within {START_TIMEOUT_S:.0f} s")


def _cluster_pidfiles(settings: Settings) -> list[tuple[Path, tuple[str, ...]]]:
    """Each started cluster node's pid file and markers, from the directories `up` created."""
    root = cluster_root(settings)
    if not root.is_dir():
        return []
    out: list[tuple[Path, tuple[str, ...]]] = []
    host = Endpoints.from_settings(settings).redis_host
    for node in sorted(root.iterdir()):
        if node.name.isdigit():
            out.append((node / "redis.pid", _node_markers(node, host, int(node.name))))
    return out


def stop_redis_cluster(settings: Settings) -> str:
    stopped = [_stop(pidfile, markers) for pidfile, markers in _cluster_pidfiles(settings)]
    return "; ".join(stopped) if stopped else "not running"


# ---------------------------------------------------------------- up / down / status


def up(settings: Settings, redis_cluster: bool = False) -> dict[str, str]:
    """Redis (or, with `redis_cluster` or a `redis+cluster://` WORKER_REDIS_URL, a 3-master Redis Cluster)
    and Kafka, each unless its address is not a loopback one."""
    ep = Endpoints.from_settings(settings)
    result = {}
    cluster = redis_cluster or redis_cluster_nodes(settings.redis_url) is not None
    name = "redis-cluster" if cluster else "redis"
    if not ep.redis_local:
        result[name] = "external, not started"
    else:
        result[name] = start_redis_cluster(settings) if cluster else start_redis(settings, ep)
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
        "redis-cluster": stop_redis_cluster(settings),
    }


def status(settings: Settings) -> dict[str, dict[str, object]]:
    if secure_marker(settings).exists():
        healthy = _kafka_healthy_conf(secure_admin_config(settings), timeout=3.0)
    else:
        healthy = kafka_healthy(settings.kafka_bootstrap)
    return {
        "kafka": {"endpoint": settings.kafka_bootstrap, "healthy": healthy},
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
        *_cluster_pidfiles(settings),
    ):
        pid = _read_pid(pidfile)
        if pid and _pid_alive(pid, *markers):
            pids.append(pid)
    return pids


def _flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--secure",
        action="store_true",
        help="up: Kafka with SASL/PLAIN and ACLs; the worker user is WORKER_KAFKA_SASL_USERNAME/PASSWORD",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="up: a 3-master Redis Cluster at WORKER_REDIS_URL=redis+cluster://127.0.0.1:PORT "
        "(PORT, PORT+1, PORT+2) instead of one Redis",
    )
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["up", "down", "status", "kafka-tool"],
        help="kafka-tool TOOL ARGS...: Kafka's own tool against WORKER_KAFKA_BOOTSTRAP, TOOL one of "
        + ", ".join(KAFKA_TOOLS),
    )
    _flags(parser)
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def cli_main(args: argparse.Namespace) -> int:
    settings = load_settings()
    rest: list[str] = list(getattr(args, "tool_args", None) or [])
    if args.action == "kafka-tool":
        usage = (
            f"usage: python -m worker stack kafka-tool TOOL [ARGS...], TOOL one of "
            f"{', '.join(KAFKA_TOOLS)}; `stack kafka-tool TOOL --help` shows the tool's own options"
        )
        if not rest or rest[0] in ("-h", "--help"):
            print(usage, file=sys.stdout if rest else sys.stderr)
            return 0 if rest else 2
        try:
            return run_kafka_tool(settings, rest[0], rest[1:])
        except StackError as exc:
            print(f"stack kafka-tool failed: {exc}", file=sys.stderr)
            return 2
    if rest:  # flags given after the action: `stack up --redis-cluster`
        _flags(argparse.ArgumentParser(prog=f"stack {args.action}")).parse_args(rest, namespace=args)
    if args.action == "up":
        try:
            if getattr(args, "secure", False):
                started = up_secure(settings)
            else:
                started = up(settings, redis_cluster=getattr(args, "redis_cluster", False))
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


# ---------------------------------------------------------------- one service at a time (fault tests)

SERVICES = ("kafka", "redis")


def _service_files(settings: Settings, name: str) -> tuple[Path, tuple[str, ...]]:
    ep = Endpoints.from_settings(settings)
    root = stack_dir(settings)
    if name == "kafka":
        return root / "kafka" / "kafka.pid", (str(root / "kafka" / "server.properties"),)
    if name == "redis":
        return root / "redis" / "redis.pid", _redis_markers(root / "redis", ep)
    raise ValueError(f"unknown service {name!r}: expected one of {SERVICES}")


def stop_service(settings: Settings, name: str, *, kill: bool = False) -> str:
    """Stop one service of this stack (SIGTERM, or SIGKILL with `kill`), keeping its data for a restart.

    Only the pid `up` recorded is signalled, after checking its command line, as `down` does.
    """
    pidfile, markers = _service_files(settings, name)
    if not kill:
        return _stop(pidfile, markers)
    pid = _read_pid(pidfile)
    if pid is None or not _pid_alive(pid, *markers):
        pidfile.unlink(missing_ok=True)
        return "not running"
    os.kill(pid, signal.SIGKILL)
    while _pid_alive(pid, *markers):
        time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return f"killed (pid {pid})"


def start_service(settings: Settings, name: str) -> str:
    """Start one service again on its port and data directory (a secured Kafka stays secured)."""
    ep = Endpoints.from_settings(settings)
    if name == "redis":
        return start_redis(settings, ep)
    if name == "kafka":
        if secure_marker(settings).exists():
            return start_kafka_secure(settings, ep)
        return start_kafka(settings, ep)
    raise ValueError(f"unknown service {name!r}: expected one of {SERVICES}")


# ---------------------------------------------------------------- secured Kafka: SASL/PLAIN and ACLs

ADMIN_USER = "admin"


def secure_marker(settings: Settings) -> Path:
    """Present while this stack's Kafka runs in secured mode; holds the admin password (mode 0600)."""
    return stack_dir(settings) / "kafka" / "admin.secret"


def admin_password(settings: Settings) -> str:
    """The secured broker's admin password: generated once per stack directory, kept in a 0600 file."""
    path = secure_marker(settings)
    try:
        return path.read_text().strip()
    except OSError:
        pass
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret)
    return secret


def _jaas_quote(value: str) -> str:
    if '"' in value or "\\" in value or ";" in value:
        raise StackError('SASL user names and passwords of the local stack may not contain " \\ or ;')
    return value


def _kafka_secure_properties(data: Path, host: str, port: int, users: dict[str, str]) -> str:
    """KRaft broker+controller: a SASL_PLAINTEXT client listener (SASL/PLAIN), ACLs (StandardAuthorizer).

    The controller listener uses SASL/PLAIN too, as `admin`: the broker reaches its controller over it, and
    a PLAINTEXT controller listener would make its ANONYMOUS principal a super user.
    """
    controller = port + 1
    admin = _jaas_quote(users[ADMIN_USER])
    user_entries = " ".join(f'user_{_jaas_quote(u)}="{_jaas_quote(p)}"' for u, p in users.items())
    jaas = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'username="{ADMIN_USER}" password="{admin}" {user_entries};'
    )
    base = _kafka_properties(data, host, port).splitlines()
    replaced = {
        "listeners": f"listeners=SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller}",
        "advertised.listeners": f"advertised.listeners=SASL_PLAINTEXT://{host}:{port}",
        "inter.broker.listener.name": "inter.broker.listener.name=SASL_PLAINTEXT",
        "listener.security.protocol.map": (
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT"
        ),
        "auto.create.topics.enable": "auto.create.topics.enable=false",
    }
    lines = [replaced.get(line.split("=", 1)[0], line) for line in base if line]
    lines += [
        "sasl.enabled.mechanisms=PLAIN",
        "sasl.mechanism.inter.broker.protocol=PLAIN",
        "sasl.mechanism.controller.protocol=PLAIN",
        f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
        f"listener.name.controller.plain.sasl.jaas.config={jaas}",
        "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        f"super.users=User:{ADMIN_USER}",
        "allow.everyone.if.no.acl.found=false",
        "",
    ]
    return "\n".join(lines)


def _secure_users(settings: Settings) -> dict[str, str]:
    users = {ADMIN_USER: admin_password(settings)}
    worker_user = settings.kafka_sasl_username
    worker_password = settings.kafka_sasl_password.get_secret_value()
    if worker_user and worker_user != ADMIN_USER:
        if not worker_password:
            raise StackError("WORKER_KAFKA_SASL_PASSWORD is required for the secured stack's worker user")
        users[worker_user] = worker_password
    return users


def start_kafka_secure(settings: Settings, ep: Endpoints) -> str:
    """Like `start_kafka`, with SASL/PLAIN and ACLs; users: `admin` and WORKER_KAFKA_SASL_USERNAME."""
    users = _secure_users(settings)
    root = stack_dir(settings) / "kafka"
    config = root / "server.properties"
    pid = _read_pid(root / "kafka.pid")
    if pid and _pid_alive(pid, str(config)):
        return f"already running (pid {pid})"
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    # start_kafka writes the plain config; write the secured one first and have it reused.
    secured = _kafka_secure_properties(data, ep.kafka_host, ep.kafka_port, users)
    return _start_kafka_with(settings, ep, secured)


def _start_kafka_with(settings: Settings, ep: Endpoints, properties: str) -> str:
    """`start_kafka` with another server.properties (and a health probe that can authenticate)."""
    admin_conf = secure_admin_config(settings)
    pid = _launch_kafka(settings, ep, properties, lambda: _kafka_healthy_conf(admin_conf, timeout=2.0))
    return f"started, SASL_PLAINTEXT with ACLs (pid {pid})"


def secure_admin_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings of the secured stack's super user (for topics and ACLs)."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": ADMIN_USER,
        "sasl.password": admin_password(settings),
    }


def _kafka_healthy_conf(conf: dict[str, Any], timeout: float) -> bool:
    from confluent_kafka.admin import AdminClient

    host, _, port = conf["bootstrap.servers"].split(",")[0].strip().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError:
        return False
    try:
        AdminClient({**conf, "log_level": 0}).list_topics(timeout=timeout)
    except Exception:
        return False
    return True


def grant_worker_acls(settings: Settings, timeout_s: float = 30.0) -> list[str]:
    """Create the worker's topics and ACLs as admin: the worker user may read its inputs (`clicks`,
    `score-requests`, the shared trainer's lease topic) in its consumer groups (prefix WORKER_GROUP_ID)
    and write its outputs (scores, model-versions, clicks-dlq); nothing else. Returns the bindings
    created, readable."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        NewTopic,
        ResourcePatternType,
        ResourceType,
    )

    user = settings.kafka_sasl_username
    if not user or user == ADMIN_USER:
        raise StackError("set WORKER_KAFKA_SASL_USERNAME to the worker user (not admin) to grant its ACLs")
    admin = AdminClient(secure_admin_config(settings))
    topics = [
        settings.input_topic,
        settings.requests_topic,
        settings.scores_topic,
        settings.versions_topic,
        settings.dlq_topic,
    ]
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    missing = [
        NewTopic(t, num_partitions=settings.topic_partitions, replication_factor=1)
        for t in topics
        if t not in existing
    ]
    if settings.lease_topic not in existing:
        missing.append(NewTopic(settings.lease_topic, num_partitions=1, replication_factor=1))
    if missing:
        for future in admin.create_topics(missing, request_timeout=timeout_s).values():
            future.result(timeout=timeout_s)
    principal = f"User:{user}"
    allow = AclPermissionType.ALLOW
    lit, pre = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    wanted: list[tuple[ResourceType, str, ResourcePatternType, AclOperation]] = []
    for topic in (settings.input_topic, settings.requests_topic, settings.lease_topic):
        wanted += [
            (ResourceType.TOPIC, topic, lit, AclOperation.READ),
            (ResourceType.TOPIC, topic, lit, AclOperation.DESCRIBE),
        ]
    for topic in (settings.scores_topic, settings.versions_topic, settings.dlq_topic):
        wanted += [
            (ResourceType.TOPIC, topic, lit, AclOperation.WRITE),
            (ResourceType.TOPIC, topic, lit, AclOperation.DESCRIBE),
        ]
    wanted.append((ResourceType.GROUP, settings.group_id, pre, AclOperation.READ))
    bindings = [AclBinding(rt, name, pt, principal, "*", op, allow) for rt, name, pt, op in wanted]
    for future in admin.create_acls(bindings, request_timeout=timeout_s).values():
        future.result(timeout=timeout_s)
    return [f"{principal} {op.name} {rt.name}:{name} ({pt.name})" for rt, name, pt, op in wanted]


def up_secure(settings: Settings) -> dict[str, str]:
    """`stack up --secure`: Redis as usual; Kafka with SASL/PLAIN and ACLs for the worker user."""
    ep = Endpoints.from_settings(settings)
    if not ep.kafka_local:
        raise StackError("--secure starts a local Kafka: WORKER_KAFKA_BOOTSTRAP must be a loopback address")
    result = {"redis": start_redis(settings, ep) if ep.redis_local else "external, not started"}
    result["kafka"] = start_kafka_secure(settings, ep)
    acls = grant_worker_acls(settings)
    result["acls"] = f"{len(acls)} bindings for User:{settings.kafka_sasl_username}"
    return result
