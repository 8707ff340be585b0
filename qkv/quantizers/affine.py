"""Quantizers: affine integer quantization (1-8 bits) and plain float casts.

Affine quantization works on blocks of ``block`` consecutive values: along D within a token
(``axis="token"``) or along tokens within a channel (``axis="channel"``, KIVI's keys). Modes:

- ``sym``: mid-tread, levels ``-qmax..qmax`` with ``qmax = 2**(bits-1) - 1`` (the reference QVG
  choice; INT2 uses 3 of its 4 codes);
- ``midrise``: symmetric without a zero level, all ``2**bits`` codes at half-integer multiples of the
  scale (INT2: +-0.5 and +-1.5 steps) and still no zero point to store;
- ``asym``: min/max with a stored zero point (KIVI-style).

Every mode dequantizes as ``x_hat = (code - offset) * scale + zero``. Scales are stored in
``scale`` format (fp32/fp16/bf16/fp8 = E4M3), rounded up, and asymmetric zero points (same format)
rounded down, relative to a power-of-two multiplier per (batch, head) row that keeps them in the
format's range; so every block's values lie inside the stored grid and the error of every element
is at most half the stored step.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import torch

from qkv.component import Component, check_choice, check_int
from qkv.dtypes import FLOAT_FORMATS
from qkv.errors import ConfigError
from qkv.registry import Registry, format_token

QUANTIZERS: Registry[Component] = Registry("quantizer")

MODES = ("sym", "midrise", "asym")
AXES = ("token", "channel")


@dataclasses.dataclass(frozen=True)
class AffineQuantizer(Component):
    """Affine integer quantizer; registered as ``int1`` ... ``int8``.

    Args:
        bits: code width, 1..8 (``sym`` needs >= 2: it has ``2**(bits-1)-1`` levels per side).
        block: values per block (one scale, one zero point per block).
        mode: ``sym``, ``midrise`` or ``asym`` (see the module docstring).
        axis: ``token`` (blocks along D) or ``channel`` (blocks along tokens).
        scale: storage format of scales and zero points: fp32, fp16, bf16 or fp8 (E4M3).
    """

    name: ClassVar[str] = "int"
    bits: int
    block: int = 64
    mode: str = "midrise"
    axis: str = "token"
    scale: str = "fp8"

    def __post_init__(self) -> None:
        kind = f"int{self.bits}"
        check_int("quantizer", "bits", self.bits, 1, 8)
        check_int(kind, "block", self.block, 1)
        check_choice(kind, "mode", self.mode, MODES)
        check_choice(kind, "axis", self.axis, AXES)
        check_choice(kind, "scale", self.scale, tuple(FLOAT_FORMATS))
        if self.mode == "sym" and self.bits < 2:
            raise ConfigError("int1: mode=sym has no level besides zero; use midrise or asym")

    @property
    def token(self) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        args = {k: getattr(self, k) for k in ("block", "mode", "axis", "scale")}
        return format_token(f"int{self.bits}", {k: v for k, v in args.items() if v != defaults[k]})

    @property
    def levels(self) -> int:
        return 2 * (2 ** (self.bits - 1) - 1) + 1 if self.mode == "sym" else 2**self.bits

    @property
    def offset(self) -> float:
        """Code of the zero level (half-integer for midrise, 0 for asym)."""
        if self.mode == "sym":
            return float(2 ** (self.bits - 1) - 1)
        if self.mode == "midrise":
            return (2**self.bits - 1) / 2
        return 0.0

    @property
    def steps(self) -> float:
        """Scale = range / steps: the block's value range spans this many steps."""
        return float(self.levels - 1) if self.mode == "asym" else self.offset

    @property
    def has_zero(self) -> bool:
        return self.mode == "asym"

    @property
    def scale_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.scale]


@dataclasses.dataclass(frozen=True)
class CastQuantizer(Component):
    """Stores values as a float format (registered as ``fp32``, ``fp16``, ``bf16``): no codes,
    no scales, no packing. ``bf16`` is the uncompressed baseline."""

    name: ClassVar[str] = "cast"
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        check_choice("cast", "dtype", self.dtype, ("fp32", "fp16", "bf16"))

    @property
    def token(self) -> str:
        return self.dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.dtype]


def _affine_factory(bits: int):
    def factory(**kwargs: object) -> AffineQuantizer:
        return AffineQuantizer(bits=bits, **kwargs)

    factory.__signature__ = _affine_signature  # type: ignore[attr-defined]
    return factory


def _cast_factory(dtype: str):
    def factory() -> CastQuantizer:
        return CastQuantizer(dtype=dtype)

    return factory


_affine_signature = inspect.Signature(
    [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(AffineQuantizer)
        if f.name != "bits"
    ]
)

for _bits in range(1, 9):
    QUANTIZERS.register(f"int{_bits}")(_affine_factory(_bits))
for _dtype in ("fp32", "fp16", "bf16"):
    QUANTIZERS.register(_dtype)(_cast_factory(_dtype))
