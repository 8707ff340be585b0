"""How to draw valid parameters for each registered component.

A table keyed by (registry kind, registered name) holds a function ``shape -> strategy of keyword
arguments`` (``shape``: the [B, H, S, D] the component will see, or None). Components without an
entry get parameters derived from their factory's signature: booleans drawn, integers from
``{default, 1, 2, 4}``, anything else left at its default; combinations the component rejects
(ConfigError) are redrawn. Declare your own with :func:`register_params`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable

from hypothesis import strategies as st

from qkv.errors import ConfigError
from qkv.grouping.kmeans import INITS

Shape = tuple[int, int, int, int] | None
ParamStrategy = Callable[[Shape], st.SearchStrategy[dict[str, object]]]

_TABLE: dict[tuple[str, str], ParamStrategy] = {}
_NEEDS: dict[tuple[str, str], str] = {("grouping", "faiss"): "faiss"}  # optional imports


def register_params(kind: str, name: str) -> Callable[[ParamStrategy], ParamStrategy]:
    """Decorator: ``@register_params("smoothing", "mine")`` on ``fn(shape) -> strategy of kwargs``."""

    def decorator(fn: ParamStrategy) -> ParamStrategy:
        _TABLE[(kind, name)] = fn
        return fn

    return decorator


def available(kind: str, name: str) -> bool:
    """False when the component needs an optional package that is not installed."""
    module = _NEEDS.get((kind, name))
    return module is None or _installed(module)


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def param_strategy(kind: str, name: str, factory: Callable) -> ParamStrategy:
    """The registered parameter strategy of ``name``, or one derived from ``factory``."""
    return _TABLE.get((kind, name)) or derived_params(factory, f"{kind} {name!r}")


@functools.lru_cache(maxsize=4096)
def params_for(kind: str, name: str, factory: Callable, shape: Shape) -> st.SearchStrategy[dict[str, object]]:
    """The keyword-argument strategy of one component for one shape (built once, then reused:
    hypothesis validates every new strategy object)."""
    return param_strategy(kind, name, factory)(shape)


@functools.lru_cache(maxsize=None)
def derived_params(factory: Callable, label: str = "component") -> ParamStrategy:
    """Parameters from the signature: bool -> booleans, int -> {default, 1, 2, 4}, others fixed."""
    fields: dict[str, st.SearchStrategy] = {}
    for param in inspect.signature(factory).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        if default is param.empty:
            raise ConfigError(
                f"{label}: cannot draw its required parameter {param.name!r}; declare its parameters "
                "with qkv.testing.register_params"
            )
        if isinstance(default, bool):
            fields[param.name] = st.booleans()
        elif isinstance(default, int):
            fields[param.name] = st.sampled_from(list(dict.fromkeys([default, 1, 2, 4])))
        else:
            fields[param.name] = st.just(default)
    strategy = st.fixed_dictionaries(fields)
    return lambda shape: strategy


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _fixed(**fields: st.SearchStrategy) -> ParamStrategy:
    strategy = st.fixed_dictionaries(fields)
    return lambda shape: strategy


register_params("grouping", "kmeans")(_fixed(
    clusters=st.sampled_from([1, 2, 3, 8, 16, 64]),
    iters=st.sampled_from([0, 1, 3]),
    tol=st.sampled_from([1e-4, 0.0]),
    init=st.sampled_from(INITS),
    seed=st.integers(0, 3),
))
register_params("grouping", "faiss")(_fixed(
    clusters=st.sampled_from([1, 2, 3, 8]), iters=st.sampled_from([1, 3]), seed=st.integers(0, 3)
))
register_params("smoothing", "centroid")(_fixed(dtype=st.sampled_from(["bf16", "fp16", "fp32"])))
register_params("staging", "progressive")(_fixed(stages=st.integers(2, 4)))


@st.composite
def _block_grid(draw, shape: Shape):
    if shape is None:  # one token per frame: any S is a whole number of frames
        height = width = 1
    else:
        per_frame = draw(st.sampled_from(divisors(shape[2])))
        height = draw(st.sampled_from(divisors(per_frame)))
        width = per_frame // height
    return {
        "t": draw(st.integers(1, 3)),
        "h": draw(st.integers(1, 4)),
        "w": draw(st.integers(1, 4)),
        "height": height,
        "width": width,
    }


@register_params("grouping", "blocks")
def _blocks(shape: Shape):
    return _block_grid(shape)


@st.composite
def _affine_params(draw, bits: int, shape: Shape):
    axis = draw(st.sampled_from(["token", "channel"]))
    if axis == "token":
        blocks = [b for b in (16, 32, 64, 8, 4, 2, 1, 128) if shape is None or shape[3] % b == 0]
        if shape is not None and shape[3] not in blocks:
            blocks.append(shape[3])
    else:  # blocks along tokens: keep to those that fit the span
        blocks = [b for b in (16, 32, 8, 4, 2, 64) if shape is None or b <= max(shape[2], 2)]
    return {
        "block": draw(st.sampled_from(blocks)),
        "mode": draw(st.sampled_from(["midrise", "asym", "sym"] if bits >= 2 else ["midrise", "asym"])),
        "axis": axis,
        "scale": draw(st.sampled_from(["fp8", "fp16", "bf16", "fp32"])),
    }


def _affine(bits: int) -> ParamStrategy:
    return lambda shape: _affine_params(bits, shape)


for _bits in range(1, 9):
    register_params("quantizer", f"int{_bits}")(_affine(_bits))
