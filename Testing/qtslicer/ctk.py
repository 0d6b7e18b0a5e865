"""The ``ctk`` module: the CTK widgets of :mod:`qtslicer.widgets`, and a class that cannot be made for every other
CTK class name (Slicer's GUI connectors compare widget types with classes the panel never uses)."""

from __future__ import annotations

from typing import Any

from qtslicer.widgets import ctkCollapsibleButton, ctkComboBox, ctkMessageBox, ctkSliderWidget

__all__ = ["ctkCollapsibleButton", "ctkComboBox", "ctkMessageBox", "ctkSliderWidget", "unprovided"]

_UNPROVIDED: dict[str, type] = {}


def unprovided(name: str) -> type:
    """A class named ``name`` that no object is ever an instance of: making one raises."""
    cls = _UNPROVIDED.get(name)
    if cls is None:
        def refuse(self: Any, *arguments: Any, **keywords: Any) -> None:
            raise NotImplementedError(f"{name} is not provided by the test harness (TextSeg's panel does not use it)")

        cls = _UNPROVIDED[name] = type(name, (), {"__init__": refuse})
    return cls


def __getattr__(name: str) -> type:
    if name.startswith("ctk"):
        return unprovided(name)
    raise AttributeError(f"module 'ctk' has no attribute {name!r}")
