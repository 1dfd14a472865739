"""The alerting rules: the committed files are the rendering of the default settings, promtool accepts them,
every alert fires in a promtool unit test fed by series a running worker really exports (and stays quiet
in one where its condition is not met), and a real Prometheus scraping a real worker fires one."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import _SCRAPE_SERIES, _exported_names, _run_promtool

from worker.config import Settings
from worker.ops import alerts

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "alerts.yml"
K8S_RULES = REPO / "deploy" / "k8s" / "prometheus-rules.yaml"
W = {"job": "ctr-worker", "instance": "w:9400"}


def test_committed_rules_are_the_rendering_of_the_default_settings(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert RULES.read_text() == alerts.render(s), (
        "stale: run `python -m worker alerts --out deploy/alerts.yml`"
    )
    assert K8S_RULES.read_text() == alerts.configmap(s), (
        "stale: run `python -m worker alerts --configmap --out deploy/k8s/prometheus-rules.yaml`"
    )
    cm = yaml.safe_load(K8S_RULES.read_text())
    assert cm["data"]["ctr-worker-alerts.yml"] == RULES.read_text()


def test_thresholds_come_from_the_settings(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("WORKER_ALERT_DLQ_SHARE", "0.25")
    clean_env.setenv("WORKER_ALERT_LAG_FOR_S", "120")
    rules = {r["alert"]: r for r in yaml.safe_load(alerts.render(Settings()))["groups"][0]["rules"]}
    assert rules["CtrWorkerDeadLetterShareHigh"]["expr"].endswith("> 0.25")
    assert rules["CtrWorkerConsumerLagGrowing"]["for"] == "2m"
    assert "[2m]" in rules["CtrWorkerConsumerLagGrowing"]["expr"]
    assert [alerts.duration(n) for n in (0, 90, 600, 7200, 86400)] == ["0s", "90s", "10m", "2h", "1d"]


def test_rules_pass_promtool_and_a_broken_one_does_not(tmp_path: Path) -> None:
    proc = _run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(alerts.alerts(Settings()))} rules found".encode() in proc.stdout
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text().replace("ctr_worker_consumer_lag[", "ctr_worker_consumer_lag(", 1))
    assert _run_promtool("check", "rules", str(broken)).returncode != 0


def test_prometheus_loads_the_rules_in_compose(tmp_path: Path) -> None:
    prom = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    assert (REPO / "deploy" / prom["rule_files"][0]).samefile(RULES)
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert "./deploy/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["services"]["prometheus"]["volumes"]


def test_docs_say_what_to_do_for_every_alert(clean_env: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text()
    ops = (REPO / "docs" / "operations.md").read_text()
    assert "## Alerts" in ops
    for a in alerts.alerts(Settings()):
        assert f"`{a.name}`" in readme, a.name
        assert f"`{a.name}`" in ops, a.name


# ---------------------------------------------------------------- promtool unit tests, fed by a real scrape


def _cases(s: Settings) -> list[dict[str, Any]]:
    """(alert, fires?, eval time, input series) for every alert, each with a firing case and a quiet one
    that differs in the condition the alert watches. Series are (name, extra labels, values)."""
    old = [("process_start_time_seconds", {}, "0x600")]
    young = [("process_start_time_seconds", {}, f"{5 * 3600}x600")]
    seg = {"scope": "segment"}
    auc = {"segment": "a"}
    busy = ("ctr_worker_online_window_events", auc, "500x800")
    lag = "ctr_worker_consumer_lag"
    failed, rejected = "ctr_worker_trainings_failed_total", "ctr_worker_trainings_rejected_total"
    promoted, buffered = "ctr_worker_trainings_promoted_total", "ctr_worker_events_buffered_total"
    dep = "ctr_worker_dependency_errors_total"
    consumed, dead = "ctr_worker_events_consumed_total", "ctr_worker_events_dead_lettered_total"
    return [
        dict(alert="CtrWorkerDown", fires={}, at="10m", series=[("up", {}, "1 1 0x20")]),
        dict(alert="CtrWorkerNotReady", fires={}, at="20m", series=[("ctr_worker_ready", {}, "1 1 0x30")]),
        dict(
            alert="CtrWorkerNotReady",
            fires=None,
            at="20m",
            series=[("ctr_worker_ready", {}, "1 0x5 1 0x5 1 0x5 1x10")],
        ),
        dict(
            alert="CtrWorkerDown",
            fires=None,
            at="10m",
            series=[("up", {}, "1x20"), ("up", {"instance": "gpu:9400", "optional": "true"}, "0x20")],
        ),
        dict(
            alert="CtrWorkerConsumerLagGrowing",
            fires={"partition": "0"},
            at="40m",
            series=[(lag, {"partition": "0"}, "0+1000x60")],
        ),
        dict(
            alert="CtrWorkerConsumerLagGrowing",
            fires=None,
            at="40m",
            series=[(lag, {"partition": "0"}, "20000x60"), (lag, {"partition": "1"}, "0+10x60")],
        ),
        dict(
            alert="CtrWorkerTrainingsFailing", fires=seg, at="10m", series=[(failed, seg, "0 1 2 3 4 5x60")]
        ),
        dict(alert="CtrWorkerTrainingsFailing", fires=None, at="10m", series=[(failed, seg, "0 1 1x60")]),
        dict(
            alert="CtrWorkerGateRejectsEverything",
            fires=seg,
            at="7h",
            series=[(rejected, seg, "0+1x600"), (promoted, seg, "0x600"), *old],
        ),
        dict(
            alert="CtrWorkerGateRejectsEverything",
            fires=None,
            at="7h",
            series=[(rejected, seg, "0+1x600"), (promoted, seg, "0x300 1x300"), *old],
        ),
        dict(
            alert="CtrWorkerGateRejectsEverything",
            fires=None,
            at="7h",
            series=[(rejected, seg, "0+1x600"), (promoted, seg, "0x600"), *young],
        ),
        dict(
            alert="CtrWorkerOnlineAucBelowFloor",
            fires=auc,
            at="45m",
            series=[("ctr_worker_online_auc", auc, "0.5x60"), busy],
        ),
        dict(
            alert="CtrWorkerOnlineAucBelowFloor",
            fires=None,
            at="45m",
            series=[
                ("ctr_worker_online_auc", auc, "0.5x60"),
                ("ctr_worker_online_window_events", auc, f"{s.alert_auc_min_events - 1}x60"),
                ("ctr_worker_online_auc", {"segment": "b"}, "0.7x60"),
                ("ctr_worker_online_window_events", {"segment": "b"}, "500x60"),
            ],
        ),
        dict(
            alert="CtrWorkerOnlineAucDropped",
            fires=auc,
            at="11h",
            series=[("ctr_worker_online_auc", auc, "0.8x600 0.6x200"), busy],
        ),
        dict(
            alert="CtrWorkerOnlineAucDropped",
            fires=None,
            at="11h",
            series=[("ctr_worker_online_auc", auc, "0.8x600 0.78x200"), busy],
        ),
        dict(
            alert="CtrWorkerDeadLetterShareHigh",
            fires={},
            at="30m",
            series=[(consumed, {}, "0+100x60"), (dead, {"reason": "json"}, "0+5x60")],
        ),
        dict(
            alert="CtrWorkerDeadLetterShareHigh",
            fires=None,
            at="30m",
            series=[(consumed, {}, "0+100x60"), (dead, {"reason": "json"}, "0x10 1x50")],
        ),
        dict(
            alert="CtrWorkerNoModelVersion",
            fires={},
            at="7h",
            series=[
                (buffered, {}, "0+100x600"),
                (promoted, seg, "0x600"),
                (promoted, {"scope": "shared"}, "0x600"),
                *old,
            ],
        ),
        dict(
            alert="CtrWorkerNoModelVersion",
            fires=None,
            at="7h",
            series=[
                (buffered, {}, "0+100x600"),
                (promoted, seg, "0x600"),
                (promoted, {"scope": "shared"}, "0x300 1x300"),
                *old,
            ],
        ),
        dict(
            alert="CtrWorkerNoModelVersion",
            fires=None,
            at="7h",
            series=[(buffered, {}, "0x600"), (promoted, seg, "0x600"), *old],
        ),
        dict(
            alert="CtrWorkerDependencyErrors",
            fires={"dependency": "kafka"},
            at="30m",
            series=[(dep, {"dependency": "kafka"}, "0+1x60")],
        ),
        dict(
            alert="CtrWorkerDependencyErrors",
            fires=None,
            at="30m",
            series=[
                (dep, {"dependency": "kafka"}, "0x10 1x50"),
                (dep, {"dependency": "redis_oom"}, "0+1x60"),
            ],
        ),
        dict(
            alert="CtrWorkerRedisOutOfMemory",
            fires={"dependency": "redis_oom"},
            at="12m",
            series=[(dep, {"dependency": "redis_oom"}, "0x10 1x50")],
        ),
        dict(
            alert="CtrWorkerRedisOutOfMemory",
            fires=None,
            at="30m",
            series=[
                (dep, {"dependency": "redis_oom"}, "0x10 1x50"),
                (dep, {"dependency": "kafka"}, "0+1x60"),
            ],
        ),
    ]


def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted({**W, **labels}.items())) + "}"


def _promtool_tests(rules: Path, s: Settings, exported: set[str]) -> dict[str, Any]:
    """The `promtool test rules` file. Every series name must be one the worker's scrape showed."""
    severity = {a.name: a.severity for a in alerts.alerts(s)}
    tests = []
    for case in _cases(s):
        for name, _, _ in case["series"]:
            assert name in exported | {"up"}, f"{name}: a series the running worker does not export"
        expected = [] if case["fires"] is None else [{"exp_labels": {**W, **case["fires"]}}]
        for exp in expected:
            exp["exp_labels"]["severity"] = severity[case["alert"]]
        tests.append(
            {
                "interval": "1m",
                "input_series": [
                    {"series": _selector(n, labels), "values": values} for n, labels, values in case["series"]
                ],
                "alert_rule_test": [
                    {"eval_time": case["at"], "alertname": case["alert"], "exp_alerts": expected}
                ],
            }
        )
    return {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}


def _without_annotations(text: str) -> str:
    """promtool compares annotations exactly; the templated ones ($value) are not what these tests check."""
    doc = yaml.safe_load(text)
    for rule in doc["groups"][0]["rules"]:
        rule.pop("annotations")
    return yaml.safe_dump(doc)


def _start_worker(settings: Settings, procs: list[Any], log: Path) -> int:
    from worker_helpers import WorkerProc, worker_env

    from worker.stream.kafka import ensure_topics

    ensure_topics(settings, [settings.input_topic])
    worker = WorkerProc(worker_env(settings), log)
    procs.append(worker)
    port = int(worker.wait_for_event("metrics endpoint", 120)["port"])
    worker.wait_for_event("assigned", 120)
    return port


@pytest.mark.integration
def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests_on_exported_series(
    settings: Settings, procs: list[Any], tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    port = _start_worker(settings, procs, tmp_path / "worker.log")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert procs[0].terminate() == 0
    exported = _exported_names(body)
    s = Settings()
    for a in alerts.alerts(s):
        names = set(re.findall(r"\b(?:ctr_worker_[a-z_]+|process_[a-z_]+|up(?=\{))", a.expr))
        assert names, a.name
        assert names - exported - _SCRAPE_SERIES == set(), f"{a.name} reads series the worker does not export"
    rules = tmp_path / "alerts.yml"
    rules.write_text(_without_annotations(RULES.read_text()))
    spec = _promtool_tests(rules, s, exported)
    fired = {
        t["alert_rule_test"][0]["alertname"] for t in spec["tests"] if t["alert_rule_test"][0]["exp_alerts"]
    }
    quiet = {
        t["alert_rule_test"][0]["alertname"]
        for t in spec["tests"]
        if not t["alert_rule_test"][0]["exp_alerts"]
    }
    assert fired == quiet == {a.name for a in alerts.alerts(s)}
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec))
    proc = _run_promtool("test", "rules", str(path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()[-4000:]
    spec["tests"][0]["alert_rule_test"][0]["exp_alerts"] = []
    path.write_text(yaml.safe_dump(spec))
    assert _run_promtool("test", "rules", str(path)).returncode != 0, "promtool accepts a wrong expectation"


# ---------------------------------------------------------------- a real Prometheus, a real worker, a fault


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> Any:
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


@pytest.mark.integration
def test_a_real_prometheus_fires_the_dead_letter_alert_when_garbage_arrives(
    settings: Settings, procs: list[Any], tmp_path: Path
) -> None:
    from worker.stream.kafka import make_producer

    port = _start_worker(settings, procs, tmp_path / "worker.log")
    fast = settings.model_copy(update={"alert_rate_window_s": 10, "alert_for_s": 2, "alert_down_for_s": 2})
    (tmp_path / "alerts.yml").write_text(alerts.render(fast))
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": ["alerts.yml"],
                "scrape_configs": [
                    {"job_name": "ctr-worker", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                ],
            }
        )
    )
    web = f"127.0.0.1:{_free_port()}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            [
                "/usr/bin/prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address={web}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def states() -> dict[str, str]:
            return {
                a["labels"]["alertname"]: a["state"]
                for a in _get(f"http://{web}/api/v1/alerts")["data"]["alerts"]
            }

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                up = _get(f"http://{web}/api/v1/query?query=up")["data"]["result"]
                if up and up[0]["value"][1] == "1":
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail((tmp_path / "prometheus.log").read_text()[-3000:])
        rules = _get(f"http://{web}/api/v1/rules")["data"]["groups"][0]["rules"]
        assert len(rules) == len(alerts.alerts(fast)) and all(r["health"] != "err" for r in rules), rules
        time.sleep(3)
        assert states() == {}, "alerts fire on a healthy, idle worker"
        producer = make_producer(settings)
        deadline = time.monotonic() + 45
        while states().get("CtrWorkerDeadLetterShareHigh") != "firing":
            assert time.monotonic() < deadline, states()
            for i in range(20):
                producer.produce(settings.input_topic, key=f"s{i}".encode(), value=b"\xffnot json")
            producer.flush(10)
            time.sleep(1)
        assert "CtrWorkerDown" not in states()
    finally:
        prom.terminate()
        prom.wait(15)
