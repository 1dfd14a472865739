"""The whole stack at once (`up`, `down`, `status`) and one service at a time (the fault tests' outages).

`down` stops exactly what `up` started: it reads the pid files and checks each pid's command line first.
"""

from __future__ import annotations

from worker.config import Settings, redis_cluster_nodes
from worker.tools.stack.endpoints import Endpoints
from worker.tools.stack.kafka import kafka_files, kafka_healthy, kafka_healthy_conf, start_kafka
from worker.tools.stack.kafka_secure import secure_admin_config, secure_marker, start_kafka_secure
from worker.tools.stack.processes import PidFile, running_pid, stop_pid
from worker.tools.stack.redis import redis_files, redis_healthy, start_redis
from worker.tools.stack.redis_cluster import cluster_pidfiles, start_redis_cluster, stop_redis_cluster

SERVICES = ("kafka", "redis")


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


def down(settings: Settings) -> dict[str, str]:
    return {
        "kafka": stop_pid(*kafka_files(settings)),
        "redis": stop_pid(*redis_files(settings)),
        "redis-cluster": stop_redis_cluster(settings),
    }


def status(settings: Settings) -> dict[str, dict[str, object]]:
    if secure_marker(settings).exists():
        healthy = kafka_healthy_conf(secure_admin_config(settings), timeout=3.0)
    else:
        healthy = kafka_healthy(settings.kafka_bootstrap)
    return {
        "kafka": {"endpoint": settings.kafka_bootstrap, "healthy": healthy},
        "redis": {"endpoint": settings.redis_url, "healthy": redis_healthy(settings.redis_url)},
    }


def started_pids(settings: Settings) -> list[int]:
    """The pids `up` recorded that are still ours and alive (used by tests to prove `down` cleans up)."""
    pidfiles = [kafka_files(settings), redis_files(settings), *cluster_pidfiles(settings)]
    return [pid for pid in (running_pid(*pidfile) for pidfile in pidfiles) if pid]


def _service_files(settings: Settings, name: str) -> PidFile:
    if name == "kafka":
        return kafka_files(settings)
    if name == "redis":
        return redis_files(settings)
    raise ValueError(f"unknown service {name!r}: expected one of {SERVICES}")


def stop_service(settings: Settings, name: str, *, kill: bool = False) -> str:
    """Stop one service of this stack (SIGTERM, or SIGKILL with `kill`), keeping its data for a restart.

    Only the pid `up` recorded is signalled, after checking its command line, as `down` does.
    """
    return stop_pid(*_service_files(settings, name), kill=kill)


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
