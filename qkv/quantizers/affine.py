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

from qkv.component import Component, check_choice
from qkv.format import AffineFormat, PackFormat, StageFormat, TensorFormat
from qkv.registry import Registry, format_token

QUANTIZERS: Registry["Quantizer"] = Registry("quantizer")


@dataclasses.dataclass(frozen=True)
class Quantizer(Component):
    """What every quantizer declares.

    ``packed``: it stores integer codes and needs a packing format (else it stores floats and
    takes no packing, smoothing or staging). :meth:`tensor_format` describes what it stores; the
    kernels read that description (a new quantizer whose data the :class:`~qkv.format.TensorFormat`
    cannot describe needs its own kernels and format first).
    """

    packed: ClassVar[bool] = True

    def code_format(self, pack: PackFormat = PackFormat()) -> AffineFormat | None:
        """The format of the integer codes, or None for a quantizer that stores floats."""
        return None

    def tensor_format(
        self, head_dim: int, *, pack: PackFormat | None, window: int, stages: tuple[StageFormat, ...]
    ) -> TensorFormat:
        """The format of a [B, H, S, ``head_dim``] tensor this quantizer stores."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AffineQuantizer(Quantizer):
    """Affine integer quantizer; registered as ``int1`` ... ``int8``.

    Args:
        bits: code width, 1..8 (``sym`` needs >= 2: it has ``2**(bits-1)-1`` levels per side).
        block: values per block (one scale, one zero point per block). Along D (``axis="token"``)
            it is the largest block: a head dim it does not divide is quantized in blocks of its
            largest divisor below ``block`` (:meth:`block_for`), so any head dim can be stored.
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
        self.code_format()  # validates every field (ConfigError naming it)

    @property
    def token(self) -> str:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        args = {k: getattr(self, k) for k in ("block", "mode", "axis", "scale")}
        return format_token(f"int{self.bits}", {k: v for k, v in args.items() if v != defaults[k]})

    def code_format(self, pack: PackFormat = PackFormat(), head_dim: int | None = None) -> AffineFormat:
        """The codes' format (levels, offset, steps, scale format: see :class:`~qkv.format.AffineFormat`);
        with ``head_dim``, in the block :meth:`block_for` gives for it."""
        block = self.block if head_dim is None else self.block_for(head_dim)
        return AffineFormat(self.bits, block, self.mode, self.axis, self.scale, pack)

    def block_for(self, head_dim: int) -> int:
        """The block a [B, H, S, ``head_dim``] tensor is quantized in: ``block`` along tokens
        (``axis="channel"``) and where it divides D, else the largest divisor of D below ``block``
        (D itself when D < ``block``: a head of 32 takes blocks of 32 under ``block=64``; 96 takes 48)."""
        if self.axis == "channel" or head_dim < 1 or head_dim % self.block == 0:
            return self.block
        return max(b for b in range(1, min(self.block, head_dim + 1)) if head_dim % b == 0)

    def tensor_format(self, head_dim, *, pack, window, stages):
        return TensorFormat(head_dim, codes=self.code_format(pack, head_dim), window=window, stages=stages)


@dataclasses.dataclass(frozen=True)
class CastQuantizer(Quantizer):
    """Stores values as a float format (registered as ``fp32``, ``fp16``, ``bf16``): no codes,
    no scales, no packing. ``bf16`` is the uncompressed baseline."""

    name: ClassVar[str] = "cast"
    packed: ClassVar[bool] = False
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        check_choice("cast", "dtype", self.dtype, ("fp32", "fp16", "bf16"))

    @property
    def token(self) -> str:
        return self.dtype

    def tensor_format(self, head_dim, *, pack, window, stages):
        return TensorFormat(head_dim, cast=self.dtype, window=window)


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
