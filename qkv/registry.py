"""One small generic registry, used for every kind of component.

A registry maps a short name (the name that appears in spec strings and error messages) to a
factory. ``build("kmeans(c=64,iters=10)")`` parses a spec token and calls the factory with the
keyword arguments; arguments are parsed as int, float, bool or left as strings.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Generic, TypeVar

from qkv.errors import SpecError, UnknownComponentError, shown

T = TypeVar("T")

# Matched against a stripped token, with one run of blanks at most (name, blanks, arguments): two
# adjacent ``\s*`` would backtrack quadratically in a long run of blanks.
_TOKEN = re.compile(r"([A-Za-z][A-Za-z0-9_\-]*)\s*(?:\((.*)\))?", re.S)


def parse_value(text: str) -> int | float | bool | str:
    """Parse one spec argument: int, float, true/false, or a bare string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_token(token: str) -> tuple[str, dict[str, object]]:
    """Split ``name(a=1,b=x)`` into ``("name", {"a": 1, "b": "x"})``."""
    match = _TOKEN.fullmatch(token.strip())
    if match is None:
        raise SpecError(f"cannot parse spec token {shown(token)}: expected name or name(key=value,...)")
    name, body = match.group(1), match.group(2)
    kwargs: dict[str, object] = {}
    if body is not None and body.strip():
        for part in body.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise SpecError(f"argument {shown(part)} in spec token {shown(token)} is not key=value")
            key = key.strip()
            if key in kwargs:
                raise SpecError(f"argument {shown(key)} given twice in spec token {shown(token)}")
            kwargs[key] = parse_value(value.strip())
    return name, kwargs


def format_token(name: str, kwargs: dict[str, object]) -> str:
    """Inverse of :func:`parse_token` (booleans print as true/false)."""
    if not kwargs:
        return name
    parts = []
    for key, value in kwargs.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        parts.append(f"{key}={text}")
    return f"{name}({','.join(parts)})"


class Registry(Generic[T]):
    """Name -> factory table for one kind of component (grouping, smoothing, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@GROUPING.register("kmeans")`` on a class or factory function."""
        if not _TOKEN.fullmatch(name) or "(" in name or " " in name:
            raise ValueError(f"invalid {self.kind} name {name!r}")

        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def list(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``; unknown names list the valid ones."""
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {self.kind} {shown(name)}; valid {self.kind} names: {', '.join(self.list())}"
            ) from None

    def build(self, token: str) -> T:
        """Build a component from a spec token such as ``kmeans(c=64,iters=10)``."""
        name, kwargs = parse_token(token)
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as exc:
            raise SpecError(f"bad arguments in {self.kind} spec token {shown(token)}: {shown(str(exc))}") from None
        return factory(**kwargs)
