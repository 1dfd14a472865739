"""Every line a worker writes to stderr is one JSON object: its own structlog events, the standard library's
`logging` of third-party libraries (transformers, librdkafka through confluent-kafka), and Python warnings.
A log shipper that parses JSON lines drops nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from worker_helpers import WorkerProc, worker_env

from worker.config import Settings
from worker.stream.kafka import ensure_topics


def _json_lines(raw: bytes) -> list[dict[str, Any]]:
    """Every non-empty line as a JSON object; fails naming the first line that is not one."""
    out = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line[:300]!r}") from None
        assert isinstance(rec, dict), line[:300]
        out.append(rec)
    return out


_SCRIPT = """
import logging, time, warnings
import structlog
from worker.config import Settings
from worker.logs import configure_logging
configure_logging("INFO")
structlog.get_logger("t").info("own event", n=1)
logging.getLogger("somelib").warning("stdlib %s", "line")
warnings.warn("a plain warning", UserWarning)
from worker.learn.adapters import attach_lora
from worker.learn.backbone import load_backbone
from worker.learn.click_model import new_click_model
settings = Settings(device="cpu", max_seq_len=16)
backbone = load_backbone(settings)
shared = new_click_model(backbone)
attach_lora(shared, rank=4, alpha=8, dropout=0.0, seed=0)
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.modeling_utils").warning("transformers says")
from worker.stream.kafka import make_producer
producer = make_producer(Settings(kafka_bootstrap="127.0.0.1:1"))
deadline = time.monotonic() + 5
while time.monotonic() < deadline:
    producer.poll(0.2)
"""


def test_library_logging_warnings_and_librdkafka_are_json_lines() -> None:
    """transformers' own handler, peft's deprecated-API FutureWarning and librdkafka's raw `%3|...` lines
    were the non-JSON lines of a worker log; here each source writes through the one JSON handler."""
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", _SCRIPT], capture_output=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:].decode(errors="replace")
    records = _json_lines(proc.stderr)
    events = {r.get("event") for r in records}
    assert {"own event", "stdlib line", "transformers says"} <= events
    warned = [r for r in records if r.get("event") == "python warning"]
    assert [(w["category"], w["message"]) for w in warned if w["message"] == "a plain warning"] == [
        ("UserWarning", "a plain warning")
    ]
    stdlib = next(r for r in records if r.get("event") == "stdlib line")
    assert (stdlib["logger"], stdlib["level"]) == ("somelib", "warning") and stdlib["timestamp"]
    assert any(r.get("logger") == "librdkafka" for r in records), records
    assert b"is_gradient_checkpointing" not in proc.stderr


@pytest.mark.integration
def test_a_running_worker_logs_json_only_and_the_metrics_endpoint_once(
    settings: Settings, procs: list[WorkerProc], tmp_path: Path
) -> None:
    ensure_topics(settings, [settings.input_topic])
    worker = WorkerProc(worker_env(settings), tmp_path / "worker.log")
    procs.append(worker)
    worker.wait_for_event("assigned", 120)
    assert worker.terminate() == 0
    records = _json_lines(worker.raw())
    assert [r["event"] for r in records].count("metrics endpoint") == 1
    assert {"starting", "assigned", "stopped"} <= {r["event"] for r in records}
