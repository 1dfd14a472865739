"""`stack up --secure`: the local Kafka with SASL/PLAIN and ACLs, an `admin` super user whose password
lives in a 0600 file, and the worker user (WORKER_KAFKA_SASL_USERNAME) allowed exactly its topics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.config import Settings
from worker.tools.stack.endpoints import Endpoints, stack_dir
from worker.tools.stack.kafka import kafka_files, kafka_healthy_conf, kafka_properties, launch_kafka
from worker.tools.stack.processes import StackError, running_pid
from worker.tools.stack.redis import start_redis

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
    base = kafka_properties(data, host, port).splitlines()
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


def secure_admin_config(settings: Settings) -> dict[str, Any]:
    """librdkafka settings of the secured stack's super user (for topics and ACLs)."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": ADMIN_USER,
        "sasl.password": admin_password(settings),
    }


def start_kafka_secure(settings: Settings, ep: Endpoints) -> str:
    """Like `start_kafka`, with SASL/PLAIN and ACLs; users: `admin` and WORKER_KAFKA_SASL_USERNAME."""
    users = _secure_users(settings)
    pid = running_pid(*kafka_files(settings))
    if pid:
        return f"already running (pid {pid})"
    data = stack_dir(settings) / "kafka" / "data"
    secured = _kafka_secure_properties(data, ep.kafka_host, ep.kafka_port, users)
    admin_conf = secure_admin_config(settings)
    pid = launch_kafka(settings, ep, secured, lambda: kafka_healthy_conf(admin_conf, timeout=2.0))
    return f"started, SASL_PLAINTEXT with ACLs (pid {pid})"


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
    inputs = (settings.input_topic, settings.requests_topic, settings.lease_topic)
    outputs = (settings.scores_topic, settings.versions_topic, settings.dlq_topic)
    for names, operation in ((inputs, AclOperation.READ), (outputs, AclOperation.WRITE)):
        for topic in names:
            wanted += [
                (ResourceType.TOPIC, topic, lit, operation),
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
