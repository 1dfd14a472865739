"""`stack kafka-tool`: Kafka's own command-line tools (`kafka-consumer-groups` and friends) from Maven jars,
against WORKER_KAFKA_BOOTSTRAP, without a Kafka distribution on the machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

from worker.config import Settings
from worker.tools.stack.kafka import KAFKA_VERSION, java, kafka_libs, log4j2_properties, resolve_jars
from worker.tools.stack.processes import StackError

KAFKA_TOOLS = {
    "consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "get-offsets": "org.apache.kafka.tools.GetOffsetShell",
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "acls": "org.apache.kafka.tools.AclCommand",
}
"""`stack kafka-tool NAME`: the main class of Kafka's `kafka-NAME.sh` script (Kafka 4.x)."""

TOOLS_LOG4J2 = log4j2_properties("STDERR", "warn")
"""Warnings only, on stderr: a tool's stdout is its answer."""


def kafka_tools_libs(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Kafka's command-line tools (`org.apache.kafka:kafka-tools`, what `kafka-consumer-groups.sh` runs),
    resolved like the broker's jars but into a folder of their own, so a running broker's jars stay put."""
    return resolve_jars(cache_dir, version, "kafka-tools", prefix="tools-")


def kafka_tool_command(settings: Settings, tool: str, args: list[str]) -> list[str]:
    """The `java ...` command line of Kafka's `kafka-<tool>.sh`, with `--bootstrap-server` set to
    WORKER_KAFKA_BOOTSTRAP unless `args` name one (or `--bootstrap-controller`)."""
    if tool not in KAFKA_TOOLS:
        raise StackError(f"unknown Kafka tool {tool!r}: one of {', '.join(sorted(KAFKA_TOOLS))}")
    libs = kafka_libs(settings.cache_dir)
    tools = kafka_tools_libs(settings.cache_dir)
    log4j = tools.parent / "tools-log4j2.properties"
    log4j.write_text(TOOLS_LOG4J2)
    given = {a.split("=", 1)[0] for a in args}
    named = given & {"--bootstrap-server", "--bootstrap-controller"}
    connect = [] if named else ["--bootstrap-server", settings.kafka_bootstrap]
    return [
        java(),
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
