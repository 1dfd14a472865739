"""The freshness benchmark's in-process half (trainer + scorer), as run on a GPU machine, on a CPU slice."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson


def test_raw_only_mode_reports_trainer_and_scorer_times() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "bench",
            "freshness",
            "--raw-only",
            "--rounds",
            "1",
            "--events",
            "16",
            "--candidates",
            "40",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WORKER_MAX_SEQ_LEN": "16", "WORKER_ADAPTER_EPOCHS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = orjson.loads(proc.stdout.strip().splitlines()[-1])
    assert result["mode"] == "raw-only" and result["candidates"] == 40
    assert result["raw_p50_s"] > 0 and len(result["raw_rounds_s"]) == 1
