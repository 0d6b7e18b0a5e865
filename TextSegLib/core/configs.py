"""Dataclasses filled from plain data (TOML, JSON): what those formats cannot say is restored here once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = [
    "lists_as_tuples",
]


def lists_as_tuples(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` for the dataclass ``cls`` with each list given for a field declared as a tuple made a tuple (TOML
    and JSON have lists only, and a frozen config must hold tuples); every other value as it is."""
    tuples = {field.name for field in dataclasses.fields(cls) if "tuple" in str(field.type)}
    return {key: tuple(value) if key in tuples and isinstance(value, list) else value for key, value in values.items()}
