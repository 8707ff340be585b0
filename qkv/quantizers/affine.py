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

from qkv.bounds import FLUSH, U32, Bound, ErrorState, rounding_error
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

    def error_bound(
        self, scales: torch.Tensor, zeros: torch.Tensor | None, mult: torch.Tensor | None
    ) -> ErrorState:
        """Guaranteed error of the dequantized values, from the stored block parameters alone.

        scales / zeros: [N, R, G] as stored (rows as quantized: R = tokens for ``axis="token"``,
        R = D for ``axis="channel"``); mult: [N] fp32 powers of two, or None. With ``s`` and ``z``
        the fp32 scale and zero point the decoder uses (stored value times ``mult``), ``L = levels
        - 1`` and ``u = 2**-24``, every element of a block satisfies::

            |x_hat - x| <= s / 2 + 16 u ((L + 1) s + |z|) + (L + 4) 2**-126 max(1, mult)

        ``s / 2``: round to nearest on the stored grid. The scale's own rounding is already in
        ``s``: it is stored rounded up and the zero point rounded down, so the grid covers the
        block. ``16 u (...)``: the fp32 arithmetic of ``(x - z) / s + offset``, the clamp, and
        ``(code - offset) * s + z`` (fewer than 16 roundings of values at most ``(L + 1) s + |z|``).
        The last term covers fp32 underflow of tiny scales (gradual, or flushed to zero by a GPU
        kernel; ``2**-126`` is the smallest normal fp32). Returns the bound and the magnitude
        ``(L s + |z|)(1 + 4u)`` of the decoded values, per element in token layout [N, S_q, D].
        """
        m = mult.view(-1, 1, 1) if mult is not None else torch.ones((), device=scales.device)
        s = (scales.float() * m).double()  # exactly the decoder's fp32 scale
        z = (zeros.float() * m).double().abs() if zeros is not None else torch.zeros((), dtype=torch.float64)
        z = z.to(s.device)
        top = self.levels - 1
        tiny = (top + 4) * FLUSH * m.double().clamp_min(1)
        bound = s / 2 + 16 * U32 * ((top + 1) * s + z) + tiny
        magnitude = (top * s + z) * (1 + 4 * U32)
        bound, magnitude = (t.repeat_interleave(self.block, dim=-1) for t in (bound, magnitude))
        if self.axis == "channel":
            bound, magnitude = bound.transpose(1, 2), magnitude.transpose(1, 2)
        return ErrorState(Bound.element(bound), magnitude)


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

    def error_bound(self, stored: torch.Tensor, input_dtype: torch.dtype) -> ErrorState:
        """Guaranteed error of the stored values [..., S, D] (this format) against the input of
        ``input_dtype`` they were rounded from: 0 when the format holds every input value, else
        half an ulp, ``u(format) * |stored| + tiny / 2`` per element (inf where it overflowed)."""
        return ErrorState(Bound.element(rounding_error(stored, input_dtype)), stored.double().abs())


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
