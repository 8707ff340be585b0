"""Hypothesis strategies for components and policies, drawn from the registries at draw time.

Every kind (grouping, smoothing, staging, quantizer, packing) is drawn from its registry; a
combination is kept only if :class:`~qkv.caches.TensorPolicy` accepts it (it raises ConfigError
otherwise) and, given a shape, if the policy can compress that shape. A rejected combination is
replaced by the nearest accepted one among candidates drawn for every registered name (one kind
changed, then two, ...), so a policy always costs the same draws: hypothesis shrinks such
strategies quickly. Strategy objects are built once and reused (hypothesis validates each new one).
"""

from __future__ import annotations

import functools
import itertools

from hypothesis import reject
from hypothesis import strategies as st

from qkv.caches.policy import Policy, TensorPolicy
from qkv.component import Component
from qkv.errors import ConfigError, ShapeError
from qkv.registry import Registry
from qkv.spec import KINDS
from qkv.testing.params import Shape, available, params_for

KIND_ORDER = ("quantizer", "grouping", "smoothing", "staging", "packing")


def default_registries() -> dict[str, Registry]:
    return dict(KINDS)


@functools.lru_cache(maxsize=1024)
def _choose(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(names)


def _draw_component(draw, kind: str, registry: Registry, shape: Shape, names=None) -> Component:
    choices = tuple(n for n in registry.list() if (names is None or n in names) and available(kind, n))
    if not choices:
        raise ConfigError(f"no {kind} to draw: {names or registry.list()} (registered and installed)")
    name = draw(_choose(choices))
    factory = registry.get(name)
    params = params_for(kind, name, factory, None if shape is None else tuple(shape))
    for _ in range(5):
        try:
            return factory(**draw(params))
        except ConfigError:
            continue
    reject()


@st.composite
def components(
    draw,
    kind: str,
    *,
    names: list[str] | None = None,
    shape: Shape = None,
    registry: Registry | None = None,
) -> Component:
    """A component of ``kind`` (name drawn from ``registry``, default the qkv registry of that
    kind, optionally restricted to ``names``) with drawn valid parameters."""
    registry = registry if registry is not None else default_registries()[kind]
    return _draw_component(draw, kind, registry, shape, names)


_WINDOW = {}


def _window(shape: Shape) -> st.SearchStrategy[int]:
    top = 64 if shape is None else shape[2] + 2
    if top not in _WINDOW:
        _WINDOW[top] = st.one_of(st.just(0), st.integers(1, top))
    return _WINDOW[top]


def window_sizes(shape: Shape = None) -> st.SearchStrategy[int]:
    """0 (no window) or 1 .. S + 2 newest tokens kept in full precision."""
    return _window(shape)


@st.composite
def tensor_policies(
    draw,
    shape: Shape = None,
    *,
    fixed: dict[str, str | Component] | None = None,
    registries: dict[str, Registry] | None = None,
    window: bool = True,
) -> TensorPolicy:
    """A valid :class:`TensorPolicy` composed from the registries.

    shape: [B, H, S, D] it must be able to compress (None: any). fixed: kind -> registered name
    (parameters still drawn) or component instance. registries: kind -> registry replacing qkv's
    (e.g. one holding only a component under test). window: also draw a full-precision window.
    """
    regs = {**default_registries(), **(registries or {})}
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(KIND_ORDER)
    if unknown:
        raise ConfigError(f"unknown kinds {sorted(unknown)}; valid kinds: {', '.join(KIND_ORDER)}")

    def candidates(kind: str, inner: Shape) -> dict[str, Component]:
        value = fixed.get(kind)
        if value is not None and not isinstance(value, str):
            return {value.name: value}
        names = [value] if isinstance(value, str) else [n for n in regs[kind].list() if available(kind, n)]
        return {name: _draw_component(draw, kind, regs[kind], inner, (name,)) for name in names}

    quantizer = next(iter(candidates("quantizer", shape).values())) if "quantizer" in fixed else (
        _draw_component(draw, "quantizer", regs["quantizer"], shape)
    )
    size = draw(_window(shape)) if window else 0
    inner = shape  # what grouping, smoothing and staging see: the quantized tokens only
    if shape is not None:
        try:
            s_q = TensorPolicy(quantizer=quantizer, window=size).quantized_length(shape[2])
        except ConfigError:
            reject()
        inner = (*shape[:2], max(s_q, 1), shape[3])
    # one candidate per registered name of every other kind, then a choice among them: a fixed
    # number of draws whatever is valid, which keeps shrinking fast
    options = {kind: candidates(kind, inner) for kind in KIND_ORDER[1:]}
    chosen = {kind: options[kind][draw(_choose(tuple(options[kind])))] for kind in KIND_ORDER[1:]}
    policy = _first_valid(quantizer, size, chosen, options, shape)
    if policy is None:
        reject()
    return policy


def _first_valid(quantizer, size, chosen, options, shape) -> TensorPolicy | None:
    """The drawn combination if TensorPolicy accepts it, else the nearest accepted one: change one
    kind to another candidate, then two, then three (deterministic, no further draws)."""
    kinds = list(chosen)
    for changes in range(len(kinds) + 1):
        for subset in itertools.combinations(kinds, changes):
            alternatives = [[c for c in options[k].values() if c is not chosen[k]] for k in subset]
            for replacement in itertools.product(*alternatives):
                fields = {**chosen, **dict(zip(subset, replacement))}
                try:
                    policy = TensorPolicy(quantizer=quantizer, window=size, **fields)
                    if shape is not None:
                        policy.check_shape("x", tuple(shape))
                except (ConfigError, ShapeError):
                    continue
                return policy
    return None


@st.composite
def policies(
    draw,
    shape: Shape = None,
    *,
    fixed: dict[str, str | Component] | None = None,
    registries: dict[str, Registry] | None = None,
    window: bool = True,
) -> Policy:
    """A :class:`Policy`: one tensor policy for K and V, or (half the time) one each; arguments as
    in :func:`tensor_policies`."""
    k = draw(tensor_policies(shape, fixed=fixed, registries=registries, window=window))
    if draw(st.booleans()):
        return Policy(k, k)
    return Policy(k, draw(tensor_policies(shape, fixed=fixed, registries=registries, window=window)))
