"""The local stack for demo, tests and benchmarks: a real Kafka (KRaft, jars from Maven Central) and Redis,
or a 3-master Redis Cluster when `WORKER_REDIS_URL` is a `redis+cluster://` URL (`up --redis-cluster`).

Everything runs as child processes in their own sessions, on loopback, with data under the cache directory.
`down` stops exactly what `up` started: it reads the pid files and checks each pid's command line first.
`kafka-tool` runs Kafka's own command-line tools (`kafka-consumer-groups` and friends) from the same Maven
jars, against `WORKER_KAFKA_BOOTSTRAP`.

This package re-exports what the command table, the tests and the other tools use; each module holds one
concern: `processes` (pid files, stopping), `endpoints`, `kafka`, `kafka_tools`, `kafka_secure`, `redis`,
`redis_cluster`, `lifecycle` (up, down, status, one service at a time) and `cli`.
"""

from __future__ import annotations

from worker.tools.stack.cli import add_arguments, cli_main
from worker.tools.stack.endpoints import LOOPBACK, Endpoints, stack_dir
from worker.tools.stack.kafka import (
    KAFKA_VERSION,
    kafka_healthy,
    kafka_libs,
    start_kafka,
)
from worker.tools.stack.kafka_secure import (
    ADMIN_USER,
    admin_password,
    grant_worker_acls,
    secure_admin_config,
    secure_marker,
    start_kafka_secure,
    up_secure,
)
from worker.tools.stack.kafka_tools import KAFKA_TOOLS, kafka_tool_command, kafka_tools_libs, run_kafka_tool
from worker.tools.stack.lifecycle import (
    SERVICES,
    down,
    start_service,
    started_pids,
    status,
    stop_service,
    up,
)
from worker.tools.stack.processes import START_TIMEOUT_S, StackError
from worker.tools.stack.redis import redis_healthy, start_redis
from worker.tools.stack.redis_cluster import (
    CLUSTER_MASTERS,
    cluster_nodes,
    cluster_root,
    start_redis_cluster,
    stop_redis_cluster,
)

__all__ = [
    "ADMIN_USER",
    "CLUSTER_MASTERS",
    "KAFKA_TOOLS",
    "KAFKA_VERSION",
    "LOOPBACK",
    "SERVICES",
    "START_TIMEOUT_S",
    "Endpoints",
    "StackError",
    "add_arguments",
    "admin_password",
    "cli_main",
    "cluster_nodes",
    "cluster_root",
    "down",
    "grant_worker_acls",
    "kafka_healthy",
    "kafka_libs",
    "kafka_tool_command",
    "kafka_tools_libs",
    "redis_healthy",
    "run_kafka_tool",
    "secure_admin_config",
    "secure_marker",
    "stack_dir",
    "start_kafka",
    "start_kafka_secure",
    "start_redis",
    "start_redis_cluster",
    "start_service",
    "started_pids",
    "status",
    "stop_redis_cluster",
    "stop_service",
    "up",
    "up_secure",
]
