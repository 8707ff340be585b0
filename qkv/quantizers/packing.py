"""Bit-packing formats: integer codes in [0, 2**bits) <-> a dense container tensor.

Codes are packed along the last dimension, each row independently, as one bit stream padded with
zero bits to a whole container word:

- ``u8msb``: uint8 bytes, first element in the high bits. For 2 bits this is QVG's layout
  (``e0<<6 | e1<<4 | e2<<2 | e3``), for 4 bits two codes per byte high nibble first; 3, 5, 6 and 7
  bit codes straddle byte boundaries MSB-first.
- ``i32lsb``: int32 words, first element in the low bits (KIVI's layout: 16 INT2 codes per word,
  little-endian); widths that do not divide 32 straddle words LSB-first.

Every width 1..8 packs and unpacks exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from qkv.component import Component
from qkv.errors import ConfigError, DTypeError, ShapeError
from qkv.registry import Registry

PACKING: Registry["BitPacker"] = Registry("packing")


@dataclasses.dataclass(frozen=True)
class BitPacker(Component):
    """A packing layout: ``word_bits`` bits per container element, MSB- or LSB-first."""

    word_bits: ClassVar[int] = 8
    container: ClassVar[torch.dtype] = torch.uint8
    msb_first: ClassVar[bool] = True

    def packed_len(self, n: int, bits: int) -> int:
        """Container elements needed for ``n`` codes of ``bits`` bits."""
        return math.ceil(n * bits / self.word_bits)

    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """``codes``: uint8 [..., n] with values < 2**bits -> container [..., packed_len(n)]."""
        _check_bits(bits)
        if codes.dtype != torch.uint8:
            raise DTypeError(f"{self.name}: codes must be uint8, got {codes.dtype}")
        n = codes.shape[-1]
        shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
        if self.msb_first:
            shifts = shifts.flip(0)
        stream = ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n*bits] of 0/1
        pad = self.packed_len(n, bits) * self.word_bits - n * bits
        stream = torch.nn.functional.pad(stream, (0, pad))
        words = stream.unflatten(-1, (-1, self.word_bits)).to(torch.int64)
        place = torch.arange(self.word_bits, device=codes.device, dtype=torch.int64)
        if self.msb_first:
            place = place.flip(0)
        packed = (words << place).sum(-1)
        if self.container == torch.int32:
            packed = torch.where(packed >= 2**31, packed - 2**32, packed)
        return packed.to(self.container)

    def unpack(self, packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: container [..., m] -> uint8 codes [..., n]."""
        _check_bits(bits)
        if packed.dtype != self.container:
            raise DTypeError(f"{self.name}: packed data must be {self.container}, got {packed.dtype}")
        if packed.shape[-1] != self.packed_len(n, bits):
            raise ShapeError(
                f"{self.name}: {n} codes of {bits} bits need {self.packed_len(n, bits)} words, "
                f"got {packed.shape[-1]}"
            )
        place = torch.arange(self.word_bits, device=packed.device, dtype=torch.int64)
        if self.msb_first:
            place = place.flip(0)
        words = packed.to(torch.int64) & (2**self.word_bits - 1)
        stream = ((words.unsqueeze(-1) >> place) & 1).flatten(-2)[..., : n * bits]
        shifts = torch.arange(bits, device=packed.device, dtype=torch.int64)
        if self.msb_first:
            shifts = shifts.flip(0)
        codes = (stream.unflatten(-1, (n, bits)) << shifts).sum(-1)
        return codes.to(torch.uint8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"packing: bits must be an integer in [1, 8], got {bits!r}")


@PACKING.register("u8msb")
@dataclasses.dataclass(frozen=True)
class U8MSBPacker(BitPacker):
    """QVG's byte layout: uint8, first element in the high bits."""

    name: ClassVar[str] = "u8msb"


@PACKING.register("i32lsb")
@dataclasses.dataclass(frozen=True)
class I32LSBPacker(BitPacker):
    """KIVI's layout: int32 words, first element in the low bits."""

    name: ClassVar[str] = "i32lsb"
    word_bits: ClassVar[int] = 32
    container: ClassVar[torch.dtype] = torch.int32
    msb_first: ClassVar[bool] = False
