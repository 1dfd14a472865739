"""compose.yaml: valid for Debian's docker-compose, and in step with the Settings class."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from worker.config import Settings

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "compose.yaml"


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_docker_compose_config_validates() -> None:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose missing: `make test` installs it (apt-get install docker-compose)"
    proc = subprocess.run(
        [exe, "-f", str(COMPOSE), "--profile", "gpu", "config", "-q"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_services_and_profiles() -> None:
    services = _compose()["services"]
    assert {"kafka", "redis", "worker", "worker-gpu"} <= set(services)
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    assert "appendonly" in " ".join(services["redis"]["command"])
    assert services["kafka"]["image"].startswith("apache/kafka:4")


@pytest.mark.parametrize("service", ["worker", "worker-gpu"])
def test_worker_env_names_real_settings(service: str) -> None:
    env = _compose()["services"][service]["environment"]
    fields = set(Settings.model_fields)
    for name in env:
        assert name.startswith("WORKER_"), name
        assert name.removeprefix("WORKER_").lower() in fields, f"{name} is not a setting"
    Settings(**{k.removeprefix("WORKER_").lower(): v for k, v in env.items()})


def test_ports_match_settings() -> None:
    services = _compose()["services"]
    env = services["worker"]["environment"]
    host, _, kport = env["WORKER_KAFKA_BOOTSTRAP"].rpartition(":")
    assert host == "kafka" and any(p.endswith(f":{kport}") for p in services["kafka"]["ports"])
    rport = re.search(r":(\d+)/", env["WORKER_REDIS_URL"])
    assert rport and any(p.endswith(f":{rport.group(1)}") for p in services["redis"]["ports"])
    metrics = env["WORKER_METRICS_PORT"]
    assert any(p.endswith(f":{metrics}") for p in services["worker"]["ports"])
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
