"""Bit-packing formats: integer codes in [0, 2**bits) <-> a dense container tensor.

Codes are packed along the last dimension, each row independently, as one bit stream padded with
zero bits to a whole container word:

- ``u8msb``: uint8 bytes, first element in the high bits. For 2 bits this is QVG's layout
  (``e0<<6 | e1<<4 | e2<<2 | e3``), for 4 bits two codes per byte high nibble first; 3, 5, 6 and 7
  bit codes straddle byte boundaries MSB-first.
- ``i32lsb``: int32 words, first element in the low bits (KIVI's layout: 16 INT2 codes per word,
  little-endian); widths that do not divide 32 straddle words LSB-first.

Every width 1..8 packs and unpacks exactly. A packer produces a :class:`~qkv.format.PackFormat`;
the bit operations themselves live in :mod:`qkv.kernels.packing`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv.component import Component
from qkv.format import PackFormat
from qkv.kernels.packing import pack_codes, unpack_codes
from qkv.registry import Registry

PACKING: Registry["BitPacker"] = Registry("packing")


@dataclasses.dataclass(frozen=True)
class BitPacker(Component):
    """A packing layout: ``word_bits`` bits per container element (8 or 32), MSB- or LSB-first."""

    word_bits: ClassVar[int] = 8
    msb_first: ClassVar[bool] = True

    @property
    def format(self) -> PackFormat:
        return PackFormat(self.word_bits, self.msb_first)

    @property
    def container(self) -> torch.dtype:
        return self.format.container

    def packed_len(self, n: int, bits: int) -> int:
        """Container elements needed for ``n`` codes of ``bits`` bits."""
        return self.format.packed_len(n, bits)

    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """``codes``: uint8 [..., n] with values < 2**bits -> container [..., packed_len(n)]."""
        return pack_codes(codes, bits, self.format)

    def unpack(self, packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
        """Inverse of :meth:`pack`: container [..., m] -> uint8 codes [..., n]."""
        return unpack_codes(packed, bits, n, self.format)


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
    msb_first: ClassVar[bool] = False
