"""Models on disk: safetensors and JSON only (nothing that unpickles), each version written to a temp
directory and renamed into place, so a reader never sees half a model and a crash leaves no partial one.

A segment adapter is PEFT's own layout plus the calibration; a shared model is the encoder in Hugging Face
layout plus the head, its wide weights and its query history.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.learn import history
from worker.learn.adapters import SegmentAdapter
from worker.learn.backbone import Backbone
from worker.learn.click_model import ClickModel
from worker.learn.encoder import load_encoder

META = "meta.json"
SHARED_ENCODER = "encoder"
"""The shared model's encoder directory (Hugging Face layout): the base a segment adapter's
`adapter_config.json` names, so plain `transformers` + `peft` rebuild the encoder the worker serves."""


TMP_MARK = ".tmp-"
STALE_TMP_S = 3600.0
"""A temp directory older than this is abandoned, whoever wrote it: no save takes an hour."""
_TMP_OWNER = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>\d+)-[0-9a-f]{32}$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandoned(tmp: Path, stale_s: float = STALE_TMP_S) -> bool:
    """A temp directory no running process will rename: one of this process (a restart in the same
    container has the same host and pid) or of a dead process on this host, or one older than
    `stale_s`. Another live writer's, on this host or another sharing the store, is left alone."""
    try:
        if time.time() - tmp.stat().st_mtime > stale_s:
            return True
    except FileNotFoundError:
        return False
    owner = _TMP_OWNER.search(tmp.name)
    if owner is None or owner["host"] != _host():
        return False
    pid = int(owner["pid"])
    return pid == os.getpid() or not _alive(pid)


@contextmanager
def _atomic_dir(directory: Path) -> Iterator[Path]:
    """A temp directory beside `directory`, named after its writer (host and pid, see `abandoned`),
    renamed to it when the block ends, removed if it fails."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}{TMP_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_meta(directory: Path, meta: dict[str, Any] | None) -> None:
    (directory / META).write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str))


def _read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META
    return dict(json.loads(path.read_text())) if path.exists() else {}


def save_adapter(directory: Path, adapter: SegmentAdapter, meta: dict[str, Any] | None = None) -> Path:
    """PEFT's own layout (adapter_config.json + adapter_model.safetensors), plus head.safetensors
    (the calibration) and meta.json. Its config names `meta["base_model"]` as the base: for a segment
    adapter the shared model's `encoder/` it was trained on, so `PeftModel.from_pretrained(
    AutoModel.from_pretrained(base), directory)` is the encoder the worker serves."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with _atomic_dir(directory) as tmp:
        adapter.lora_config(str((meta or {}).get("base_model", ""))).save_pretrained(str(tmp))
        save_file(
            {k: v.contiguous() for k, v in adapter.lora.items()}, str(tmp / "adapter_model.safetensors")
        )
        save_file({"calibration": adapter.calibration.contiguous()}, str(tmp / "head.safetensors"))
        _write_meta(tmp, meta)
    return directory


def load_adapter(directory: Path) -> tuple[SegmentAdapter, dict[str, Any]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    lora = load_file(str(directory / "adapter_model.safetensors"))
    head = load_file(str(directory / "head.safetensors"))
    targets = config["target_modules"]
    adapter = SegmentAdapter(
        lora=lora,
        calibration=head["calibration"],
        rank=int(config["r"]),
        alpha=int(config["lora_alpha"]),
        target_modules=sorted(targets) if isinstance(targets, list) else [targets],
        dropout=float(config.get("lora_dropout", 0.0)),
    )
    return adapter, _read_meta(directory)


def save_shared(directory: Path, model: ClickModel, meta: dict[str, Any] | None = None) -> Path:
    """`encoder/` in Hugging Face layout (safetensors), `head.safetensors`, the query history table
    (`history.json`, if any) and `meta.json`; atomic."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with _atomic_dir(directory) as tmp:
        model.encoder.save_pretrained(str(tmp / SHARED_ENCODER), safe_serialization=True)
        head = {
            f"{part}.{k}": v.detach().float().cpu().contiguous()
            for part, module in (("head", model.head), ("match", model.match), ("history", model.history))
            for k, v in module.state_dict().items()
        }
        save_file(head, str(tmp / "head.safetensors"))
        if model.query_history is not None:
            model.query_history.save(tmp)
        _write_meta(tmp, meta)
    return directory


def load_shared(directory: Path, backbone: Backbone) -> tuple[ClickModel, dict[str, Any]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    encoder = load_encoder(directory / SHARED_ENCODER, safetensors_only=True)
    model = ClickModel(encoder, int(encoder.config.hidden_size))
    head = load_file(str(directory / "head.safetensors"))
    model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items() if k.startswith("head.")})
    for part, module in (("match", model.match), ("history", model.history)):
        wide = {k.removeprefix(f"{part}."): v for k, v in head.items() if k.startswith(f"{part}.")}
        if wide:
            module.load_state_dict(wide)
    model.query_history = history.QueryHistory.load(directory)
    return model.to(backbone.device), _read_meta(directory)
