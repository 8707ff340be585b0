"""Base class of every pluggable component (groupers, smoothers, stagings, quantizers, packers).

A component is a frozen dataclass of plain values (ints, floats, strings, bools) plus a class
attribute ``name``: the registry name that also appears in spec strings. Its spec token prints
every field that differs from its default, so ``REGISTRY.build(c.token) == c`` holds.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qkv.errors import ConfigError, shown
from qkv.registry import format_token


@dataclasses.dataclass(frozen=True)
class Component:
    name: ClassVar[str] = ""

    @property
    def token(self) -> str:
        """The spec token that rebuilds this component, e.g. ``kmeans(c=64)``."""
        changed = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.default is dataclasses.MISSING or value != field.default:
                changed[field.name] = value
        return format_token(self.name, changed)

    def replace(self, **changes: object) -> "Component":
        """A copy with some fields changed (validated like a fresh construction)."""
        return dataclasses.replace(self, **changes)

    def has_param(self, key: str) -> bool:
        return key in {f.name for f in dataclasses.fields(self)}


def check_choice(kind: str, key: str, value: object, choices: tuple) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        valid = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{kind}: {key}={shown(value)} is not supported; valid values: {valid}")


def check_int(kind: str, key: str, value: object, low: int, high: int | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high
    ):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{kind}: {key} must be an integer {bound}, got {shown(value)}")
