"""The models an operator's pin names that do not serve automatically: an older shared version, or an
adapter version other than the champion (`worker.state.pins`). Loaded from the model store on first use
and kept in small LRUs: pins are an operator's exceptions, so a few of each cover them, and a shared
model costs as much memory as the one that serves."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from worker.learn.adapters import SegmentAdapter
from worker.learn.backbone import Backbone
from worker.learn.click_model import ClickModel
from worker.learn.store import load_adapter, load_shared

PINNED_SHARED = 2
"""Older shared versions held for pins (each a whole shared model)."""
PINNED_ADAPTERS = 16
"""Pinned adapter versions held (each a few MB of LoRA factors)."""


class PinnedModels:
    def __init__(
        self, backbone: Backbone, shared_max: int = PINNED_SHARED, adapters_max: int = PINNED_ADAPTERS
    ) -> None:
        self.backbone = backbone
        self._shared: OrderedDict[int, ClickModel] = OrderedDict()
        self._adapters: OrderedDict[tuple[str, int], SegmentAdapter] = OrderedDict()
        self._shared_max = shared_max
        self._adapters_max = adapters_max

    def shared(self, version: int, locate: Callable[[], Path]) -> ClickModel:
        """Shared `version`, loaded from the directory `locate()` names the first time."""
        model = self._shared.get(version)
        if model is not None:
            self._shared.move_to_end(version)
            return model
        model, _ = load_shared(locate(), self.backbone)
        model = model.eval()
        self._shared[version] = model
        while len(self._shared) > self._shared_max:
            self._shared.popitem(last=False)
        return model

    def adapter(self, segment: str, version: int, locate: Callable[[], Path]) -> SegmentAdapter:
        """The segment's adapter `version`, loaded from the directory `locate()` names the first time."""
        key = (segment, version)
        adapter = self._adapters.get(key)
        if adapter is not None:
            self._adapters.move_to_end(key)
            return adapter
        adapter, _ = load_adapter(locate())
        self._adapters[key] = adapter
        while len(self._adapters) > self._adapters_max:
            self._adapters.popitem(last=False)
        return adapter

    def shared_versions(self) -> set[int]:
        """The shared versions held, whose served copies stay valid."""
        return set(self._shared)
