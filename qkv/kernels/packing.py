"""Bit packing of integer codes, the plain-PyTorch reference every path shares: codes in
[0, 2**bits) <-> a dense container tensor, as a :class:`~qkv.format.PackFormat` describes (each row
one bit stream, padded with zero bits to a whole word; MSB- or LSB-first)."""

from __future__ import annotations

import torch

from qkv.errors import ConfigError, DTypeError, ShapeError
from qkv.format import PackFormat


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ConfigError(f"packing: bits must be an integer in [1, 8], got {bits!r}")


def pack_codes(codes: torch.Tensor, bits: int, fmt: PackFormat) -> torch.Tensor:
    """``codes``: uint8 [..., n] with values < 2**bits -> container [..., packed_len(n)]."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise DTypeError(f"packing: codes must be uint8, got {codes.dtype}")
    n = codes.shape[-1]
    shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    if fmt.msb_first:
        shifts = shifts.flip(0)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n*bits] of 0/1
    pad = fmt.packed_len(n, bits) * fmt.word_bits - n * bits
    stream = torch.nn.functional.pad(stream, (0, pad))
    words = stream.unflatten(-1, (-1, fmt.word_bits)).to(torch.int64)
    place = torch.arange(fmt.word_bits, device=codes.device, dtype=torch.int64)
    if fmt.msb_first:
        place = place.flip(0)
    packed = (words << place).sum(-1)
    if fmt.container == torch.int32:
        packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(fmt.container)


def unpack_codes(packed: torch.Tensor, bits: int, n: int, fmt: PackFormat) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: container [..., m] -> uint8 codes [..., n]."""
    _check_bits(bits)
    if packed.dtype != fmt.container:
        raise DTypeError(f"packing: packed data must be {fmt.container}, got {packed.dtype}")
    if packed.shape[-1] != fmt.packed_len(n, bits):
        raise ShapeError(
            f"packing: {n} codes of {bits} bits need {fmt.packed_len(n, bits)} words, got {packed.shape[-1]}"
        )
    place = torch.arange(fmt.word_bits, device=packed.device, dtype=torch.int64)
    if fmt.msb_first:
        place = place.flip(0)
    words = packed.to(torch.int64) & (2**fmt.word_bits - 1)
    stream = ((words.unsqueeze(-1) >> place) & 1).flatten(-2)[..., : n * bits]
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int64)
    if fmt.msb_first:
        shifts = shifts.flip(0)
    codes = (stream.unflatten(-1, (n, bits)) << shifts).sum(-1)
    return codes.to(torch.uint8)
