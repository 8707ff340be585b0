"""Plain-PyTorch reference of the quantize+pack and unpack+dequantize(+centroids) hot paths.

Layout: the quantizer sees *rows* ``[N, R, L]`` with blocks of ``block`` consecutive values along
L. For per-token quantization a row is a token (R = S, L = D); for per-channel quantization a row
is a channel (R = D, L = tokens). N is batch x heads.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from einops import rearrange

from qkv.dtypes import max_finite, round_down, round_up
from qkv.errors import ShapeError
from qkv.quantizers.affine import AffineQuantizer
from qkv.quantizers.packing import BitPacker

# Scales and zero points use at most half of their format's range (one exponent of headroom), so
# rounding the zero point down can widen the scale without overflowing.
_HEADROOM = 0.5


@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """Packed codes and block parameters of ``[N, R, L]`` rows.

    codes: [N, R, packed_len(L)] in the packer's container dtype.
    scales: [N, R, L // block] in the quantizer's scale format (relative to ``mult``).
    zeros: like ``scales`` (asymmetric mode only), else None.
    mult: [N] float32 powers of two (None when scales are fp32).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    mult: torch.Tensor | None


def row_multiplier(peak: torch.Tensor, q: AffineQuantizer) -> torch.Tensor | None:
    """Power of two per row N that brings ``peak`` [N] (largest scale or |zero|) into range."""
    if q.scale == "fp32":
        return None
    limit = max_finite(q.scale_dtype) * _HEADROOM
    exponent = torch.ceil(torch.log2(peak / limit)).clamp(-126, 127)
    exponent = torch.where(peak > 0, exponent, torch.zeros_like(exponent))
    return torch.exp2(exponent)


def exact_div(x: torch.Tensor, value: float) -> torch.Tensor:
    """``x / value`` correctly rounded on every device (on CUDA, dividing by a Python scalar
    multiplies by its rounded reciprocal instead)."""
    return x / torch.full((), value, dtype=x.dtype, device=x.device)


def block_peaks(blocks: torch.Tensor, q: AffineQuantizer) -> torch.Tensor:
    """Largest value each block needs in the scale format (its scale or |zero point|): [N, R, G]."""
    if q.has_zero:
        low, high = blocks.amin(-1), blocks.amax(-1)
        return torch.maximum(exact_div(high - low, q.steps), low.abs())
    return exact_div(blocks.abs().amax(-1), q.steps)


def block_params(blocks: torch.Tensor, q: AffineQuantizer):
    """Stored scales and zeros of ``blocks`` [N, R, G, B] fp32, and their fp32 values.

    Returns (scales_stored, zeros_stored | None, mult | None, scale_f32, zero_f32), where the fp32
    values are the exact numbers the decoder will use: ``scale_f32 = scales_stored * mult``.
    """
    peak = block_peaks(blocks, q)
    mult = row_multiplier(peak.flatten(1).amax(-1), q)
    m = mult.view(-1, 1, 1) if mult is not None else torch.ones((), device=blocks.device)
    zeros = None
    zero_f32 = torch.zeros((), device=blocks.device)
    if q.has_zero:
        low, high = blocks.amin(-1), blocks.amax(-1)
        zeros = round_down(low / m, q.scale_dtype)
        zero_f32 = zeros.float() * m
        raw = exact_div(high - zero_f32, q.steps)
    else:
        raw = peak
    scales = round_up(raw / m, q.scale_dtype)
    return scales, zeros, mult, scales.float() * m, zero_f32


def quantize_pack_torch(x: torch.Tensor, q: AffineQuantizer, packer: BitPacker) -> QuantizedRows:
    """Quantize rows ``x`` [N, R, L] (fp32) in blocks along L and pack the codes."""
    if x.shape[-1] % q.block:
        raise ShapeError(f"int{q.bits}: block {q.block} does not divide row length {x.shape[-1]}")
    blocks = rearrange(x, "n r (g b) -> n r g b", b=q.block)
    scales, zeros, mult, scale_f, zero_f = block_params(blocks, q)
    scale_f, zero_f = scale_f.unsqueeze(-1), zero_f.unsqueeze(-1) if q.has_zero else zero_f
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    # The stored grid covers every block, so the clamp only absorbs fp32 rounding of x / scale.
    codes = torch.round((blocks - zero_f) / safe + q.offset).clamp(0, q.levels - 1)
    codes = torch.where(scale_f > 0, codes, torch.full_like(codes, math.floor(q.offset)))
    codes = rearrange(codes.to(torch.uint8), "n r g b -> n r (g b)")
    return QuantizedRows(packer.pack(codes, q.bits), scales, zeros, mult)


def dequantize_rows_torch(
    rows: QuantizedRows, q: AffineQuantizer, packer: BitPacker, length: int
) -> torch.Tensor:
    """Unpack and dequantize to fp32 rows [N, R, length]."""
    codes = packer.unpack(rows.codes, q.bits, length).float()
    m = rows.mult.view(-1, 1, 1) if rows.mult is not None else 1.0
    scale = (rows.scales.float() * m).repeat_interleave(q.block, dim=-1)
    out = (codes - q.offset) * scale
    if rows.zeros is not None:
        out = out + (rows.zeros.float() * m).repeat_interleave(q.block, dim=-1)
    return out


def dequantize_torch(
    rows: QuantizedRows,
    q: AffineQuantizer,
    packer: BitPacker,
    tokens: int,
    centroids: list[torch.Tensor],
    assignments: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack, dequantize and add back every stage's centroids: [N, tokens, D] in ``out_dtype``
    (computed in fp32, rounded once at the end).

    centroids[t]: [N, C_t, D] (stored format); assignments[t]: [N, tokens] integer.
    """
    if q.axis == "token":
        out = dequantize_rows_torch(rows, q, packer, rows.scales.shape[-1] * q.block)
    else:
        out = rearrange(dequantize_rows_torch(rows, q, packer, tokens), "n d s -> n s d")
    for cents, assign in zip(centroids, assignments, strict=True):
        out = out + torch.gather(
            cents.float(), 1, assign.long().unsqueeze(-1).expand(-1, -1, cents.shape[-1])
        )
    return out.to(out_dtype)
