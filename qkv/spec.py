"""Spec strings <-> policies, in both directions (in the spirit of faiss's index_factory).

A tensor spec is a comma-separated list of component tokens, at most one per kind, in any order:

    [grouping] [smoothing] [staging] quantizer [packing] [window(tokens=N)]

e.g. ``kmeans(clusters=256,iters=20),centroid,int2(block=64)``. Omitted kinds take their
defaults: no grouping, no smoothing, ``single`` staging, ``u8msb`` packing, no window. The token
``none`` may be written and is the default. A policy spec is one tensor spec for both K and V, or
``k:<spec>;v:<spec>``.

This module parses specs into components (one dict of fields per tensor);
:func:`qkv.caches.presets.build_policy` assembles them into policies, whose ``spec`` prints the
canonical form back.
"""

from __future__ import annotations

import re

from qkv.errors import SpecError, UnknownComponentError
from qkv.grouping import GROUPING
from qkv.quantizers import PACKING, QUANTIZERS, SMOOTHING, STAGING
from qkv.registry import parse_token

# kind (the TensorPolicy field it fills) -> registry
KINDS = {
    "grouping": GROUPING,
    "smoothing": SMOOTHING,
    "staging": STAGING,
    "quantizer": QUANTIZERS,
    "packing": PACKING,
}


def split_tokens(spec: str) -> list[str]:
    """Split at commas that are not inside parentheses."""
    tokens, depth, current = [], 0, []
    for ch in spec:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ')' in spec {spec!r}")
        if ch == "," and depth == 0:
            tokens.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth:
        raise SpecError(f"unbalanced '(' in spec {spec!r}")
    tokens.append("".join(current).strip())
    if any(not t for t in tokens):
        raise SpecError(f"empty component in spec {spec!r}")
    return tokens


def _kind_of(name: str, token: str) -> str:
    kinds = [kind for kind, registry in KINDS.items() if name in registry]
    if not kinds:
        valid = sorted({n for r in KINDS.values() for n in r.list()} | {"window"})
        raise UnknownComponentError(
            f"unknown component {name!r} in {token!r}; valid names: {', '.join(valid)}"
        )
    return kinds[0]


def parse_tensor_spec(spec: str) -> dict[str, object]:
    """The components of a tensor spec string: ``{kind: component}`` (``window``: an int), for
    ``TensorPolicy(**fields)``."""
    fields: dict[str, object] = {}
    for token in split_tokens(spec):
        name, kwargs = parse_token(token)
        if name == "none":
            if kwargs:
                raise SpecError(f"'none' takes no arguments: {token!r}")
            continue
        if name == "window":
            kind, value = "window", _window(kwargs, token)
        else:
            kind = _kind_of(name, token)
            value = KINDS[kind].build(token)
        if kind in fields:
            raise SpecError(f"spec {spec!r} has two {kind} components")
        fields[kind] = value
    if "quantizer" not in fields:
        raise SpecError(
            f"spec {spec!r} has no quantizer; add one of: {', '.join(QUANTIZERS.list())}"
        )
    return fields


def _window(kwargs: dict[str, object], token: str) -> int:
    if set(kwargs) != {"tokens"}:
        raise SpecError(f"window takes one argument, tokens=N: {token!r}")
    return kwargs["tokens"]  # type: ignore[return-value]


_SPLIT_KV = re.compile(r"^\s*k\s*:(?P<k>.*);\s*v\s*:(?P<v>.*)$", re.S)


def parse_policy_spec(spec: str) -> tuple[dict[str, object], dict[str, object]]:
    """The components of K and of V (:func:`parse_tensor_spec`) of ``<tensor spec>`` or
    ``k:<tensor spec>;v:<tensor spec>``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"a spec must be a non-empty string, got {spec!r}")
    match = _SPLIT_KV.match(spec)
    if match:
        return parse_tensor_spec(match["k"]), parse_tensor_spec(match["v"])
    if ";" in spec or ":" in spec:
        raise SpecError(f"cannot parse {spec!r}: separate keys and values as 'k:<spec>;v:<spec>'")
    tensor = parse_tensor_spec(spec)
    return tensor, tensor
