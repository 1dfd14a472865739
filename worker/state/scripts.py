"""The Lua scripts of the state modules, shipped as package data next to them."""

from __future__ import annotations

from importlib.resources import files


def lua(*names: str) -> str:
    """The named `.lua` files of this package, joined in order: shared helpers go first."""
    root = files("worker.state")
    return "\n".join(root.joinpath(name).read_text(encoding="utf-8") for name in names)
