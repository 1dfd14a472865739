"""deploy/: the Kubernetes manifests validate against the API schemas (offline), agree with Settings and
the metrics endpoint; the Grafana dashboard shows every metric; the compose observability profile is valid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from worker.config import Settings
from worker.ops.metrics import METRIC_NAMES

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
GRAFANA = REPO / "deploy" / "grafana"
# The oldest Kubernetes minor still commonly run; the manifests use nothing newer. kubernetes-validate
# ships the schemas of every version it knows inside the package, so this needs no network.
K8S_VERSION = "1.29"


def _docs() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _docs() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _env() -> dict[str, str]:
    """The worker's environment as Kubernetes builds it: ConfigMap, then Secret, then `env`."""
    env: dict[str, str] = {}
    env.update(_one("ConfigMap", "ctr-worker")["data"])
    env.update(_one("Secret")["stringData"])
    for item in _container().get("env", []):
        env[item["name"]] = item.get("value", "")
    return env


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_validates(path: str) -> None:
    docs = [d for d in yaml.safe_load_all((K8S / path).read_text()) if d]
    assert docs
    for doc in docs:
        # strict: unknown fields (typos such as `livenesProbe`) fail too.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_manifest() -> None:
    """Guards against a validator that silently accepts anything (e.g. a schema it could not load)."""
    broken = json.loads(json.dumps(_one("Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = json.loads(json.dumps(_one("Deployment")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


KEDA = K8S / "keda"


def _keda(kind: str) -> dict[str, Any]:
    found = [
        d for p in KEDA.glob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d and d["kind"] == kind
    ]
    assert len(found) == 1, kind
    return found[0]  # type: ignore[no-any-return]


def _keda_problems(scaled: dict[str, Any], auth: dict[str, Any]) -> list[str]:
    """What makes the lag scaler disagree with the worker it scales (KEDA's CRDs are not in
    kubernetes-validate's schemas, so the fields that matter are checked here)."""
    env, problems = _env(), []
    spec = scaled["spec"]
    if spec["scaleTargetRef"]["name"] != _one("Deployment")["metadata"]["name"]:
        problems.append("scaleTargetRef is not the Deployment")
    if not 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= int(env["WORKER_TOPIC_PARTITIONS"]):
        problems.append("replicas must stay within 1..WORKER_TOPIC_PARTITIONS")
    [trigger] = spec["triggers"]
    meta = trigger["metadata"]
    expected = {
        "bootstrapServers": env["WORKER_KAFKA_BOOTSTRAP"],
        "consumerGroup": env["WORKER_GROUP_ID"],
        "topic": env["WORKER_INPUT_TOPIC"],
        "allowIdleConsumers": "false",
        "sasl": env["WORKER_KAFKA_SASL_MECHANISM"].lower().replace("-", "_", 1).replace("-", ""),
        "tls": "enable" if env["WORKER_KAFKA_SECURITY_PROTOCOL"].endswith("SSL") else "disable",
    }
    problems += [f"{k}: {meta.get(k)!r} != {v!r}" for k, v in expected.items() if meta.get(k) != v]
    if trigger["type"] != "kafka" or trigger["authenticationRef"]["name"] != auth["metadata"]["name"]:
        problems.append("not a kafka trigger authenticated by the TriggerAuthentication")
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    if down["stabilizationWindowSeconds"] < grace or any(p["value"] != 1 for p in down["policies"]):
        problems.append("scale-in must remove one draining pod at a time, slower than its drain")
    container = _container()["name"]
    for ref in auth["spec"].get("env", []):
        if ref["containerName"] != container or ref["name"] not in env:
            problems.append(f"{ref['parameter']}: no {ref['name']} in the worker container")
    secret = _one("Secret")
    for ref in auth["spec"].get("secretTargetRef", []):
        if ref["name"] != secret["metadata"]["name"] or ref["key"] not in secret["stringData"]:
            problems.append(f"{ref['parameter']}: no {ref['key']} in the Secret")
    return problems


def test_keda_scales_on_the_workers_lag_within_the_partitions() -> None:
    kust = yaml.safe_load((KEDA / "kustomization.yaml").read_text())
    assert set(kust["resources"]) == {".."} | {p.name for p in KEDA.glob("*.yaml")} - {"kustomization.yaml"}
    scaled, auth = _keda("ScaledObject"), _keda("TriggerAuthentication")
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    assert _keda_problems(scaled, auth) == []
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["maxReplicaCount"] = int(_env()["WORKER_TOPIC_PARTITIONS"]) + 1
    broken["spec"]["triggers"][0]["metadata"]["consumerGroup"] = "someone-else"
    assert len(_keda_problems(broken, auth)) == 2


def test_probes_point_at_health_endpoints() -> None:
    c = _container()
    port = int(_env()["WORKER_METRICS_PORT"])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert named.get(get["port"], get["port"]) == port, probe


def test_grace_period_covers_the_drain() -> None:
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(_env().get("WORKER_DRAIN_GRACE_S", Settings.model_fields["drain_grace_s"].default))
    assert drain >= Settings.model_fields["drain_grace_s"].default
    assert grace >= drain + 10, "leave a margin for the producer flush after the drain"


def test_gpu_cpu_resources_and_security() -> None:
    c = _container()
    res = c["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 1
    assert res["requests"]["cpu"] and res["limits"]["cpu"]
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    store = _env()["WORKER_MODEL_STORE"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert store in mounts, "WORKER_MODEL_STORE needs a volume"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[store])
    claim = volume["persistentVolumeClaim"]["claimName"]
    pvc = _one("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_env_names_are_settings_and_parse() -> None:
    env = _env()
    fields = set(Settings.model_fields)
    worker_env = {k: v for k, v in env.items() if k.startswith("WORKER_")}
    for name in worker_env:
        assert name.removeprefix("WORKER_").lower() in fields, f"{name} is not a setting"
    secret = _one("Secret")["stringData"]
    assert {"WORKER_KAFKA_SASL_PASSWORD", "WORKER_REDIS_URL"} <= set(secret)
    assert all("CHANGE-ME" in v for v in secret.values()), "the Secret holds placeholders only"
    assert re.match(r"^rediss?://:[^@]+@", secret["WORKER_REDIS_URL"]), "Redis URL carries a password"
    assert not set(secret) & set(_one("ConfigMap", "ctr-worker")["data"]), (
        "a secret value is also in the ConfigMap"
    )
    Settings(**{k.removeprefix("WORKER_").lower(): v for k, v in worker_env.items()})


def test_pdb_and_service_select_the_pods() -> None:
    labels = _one("Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = _one("PodDisruptionBudget")
    svc = _one("Service")
    for selector in (pdb["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]):
        assert selector.items() <= labels.items()
    assert svc["spec"]["ports"][0]["port"] == int(_env()["WORKER_METRICS_PORT"])
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_grafana_dashboard_references_every_metric() -> None:
    text = (GRAFANA / "ctr-worker.json").read_text()
    dash = json.loads(text)
    exprs = " ".join(
        t["expr"] for p in dash["panels"] if p.get("type") != "row" for t in p.get("targets", [])
    )
    for name in METRIC_NAMES:
        assert name in exprs, f"no panel shows {name}"
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds_vars and ds_vars[0]["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel.get("type") != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_and_prometheus_config() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ctr-worker.yaml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "worker:9400" in targets


def test_compose_observability_profile() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    for name, image in (("prometheus", "prom/prometheus:"), ("grafana", "grafana/grafana:")):
        assert services[name]["profiles"] == ["observability"]
        assert services[name]["image"].startswith(image)
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), volume
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose missing: `make test` installs it (apt-get install docker-compose)"
    proc = subprocess.run(
        [exe, "-f", str(REPO / "compose.yaml"), "--profile", "observability", "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_operations_doc_lists_every_metric() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    for name in METRIC_NAMES:
        assert f"`{name}`" in text, name


# ---------------------------------------------------------------- checked by Prometheus' own promtool


def _promtool() -> str:
    exe = shutil.which("promtool")
    assert exe, (
        "promtool missing: `make test` installs it (deploy/system-deps.sh: Debian's prometheus package)"
    )
    return exe


def _run_promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([_promtool(), *args], input=stdin, capture_output=True, timeout=60, check=False)


def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    proc = _run_promtool("check", "config", str(REPO / "deploy" / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "prometheus.yml"
    broken.write_text(
        (REPO / "deploy" / "prometheus.yml").read_text().replace("scrape_interval", "scrape_intervall")
    )
    assert _run_promtool("check", "config", str(broken)).returncode != 0


_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
# Series Prometheus itself adds to every scrape target; the worker cannot export them.
_SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def _dashboard_exprs() -> list[str]:
    dash = json.loads((GRAFANA / "ctr-worker.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] if p.get("type") != "row" for t in p.get("targets", [])]
    out = []
    for expr in exprs:
        for var, value in _GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        out.append(expr)
    return out


def _parse_with_promtool(exprs: list[str], tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    """promtool has no bare expression parser; a recording rule per expression is checked by its parser."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return _run_promtool("check", "rules", str(path))


def test_every_dashboard_expression_parses_in_promtool(tmp_path: Path) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 20
    proc = _parse_with_promtool(exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (
        _parse_with_promtool([*exprs, "sum(rate(ctr_worker_events_consumed_total[5m])"], tmp_path).returncode
        != 0
    )


def _metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers right before a `{` selector or a `[` range."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))


def _exported_names(exposition: str) -> set[str]:
    """Every series name a scrape of this exposition yields, with or without samples yet (a labelled
    metric without children shows only its # TYPE line)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.mark.integration
def test_a_running_workers_metrics_pass_promtool_and_feed_every_dashboard_expression(
    settings: Settings, procs: list[Any], tmp_path: Path
) -> None:
    import urllib.request

    from worker_helpers import WorkerProc, worker_env

    from worker.stream.kafka import ensure_topics

    ensure_topics(settings, [settings.input_topic])
    worker = WorkerProc(worker_env(settings), tmp_path / "worker.log")
    procs.append(worker)
    port = worker.wait_for_event("metrics endpoint", 120)["port"]
    worker.wait_for_event("assigned", 120)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    assert worker.terminate() == 0
    proc = _run_promtool("check", "metrics", stdin=body)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = _exported_names(body.decode())
    assert (
        "ctr_worker_events_consumed_total" in exported
        and "ctr_worker_training_duration_seconds_bucket" in exported
    )
    used = set().union(*(_metric_names(e) for e in _dashboard_exprs()))
    assert len(used) >= 20
    assert used - exported - _SCRAPE_SERIES == set(), "dashboard series the worker does not export"
    bad = b"# TYPE x_seconds counter\nx_seconds 1\n"
    assert _run_promtool("check", "metrics", stdin=bad).returncode != 0
