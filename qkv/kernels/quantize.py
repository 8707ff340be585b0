"""Plain-PyTorch reference of the (centroids+)quantize+pack and unpack+dequantize(+centroids)
hot paths.

Layout: the quantizer sees *rows* ``[N, R, L]`` with blocks of ``block`` consecutive values along
L. For per-token quantization a row is a token (R = S, L = D); for per-channel quantization a row
is a channel (R = D, L = tokens). N is batch x heads.

Centroids are the two ops' mirror images: ``quantize_pack`` can subtract every stage's stored
centroids (gathered by assignment) from its input before quantizing, ``dequantize`` adds them back
after; both work in fp32 and take them as lists ``centroids[t]`` [N, C_t, D] (stored format) and
``assignments[t]`` [N, S] (integer), one entry per stage, in encoding order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from einops import rearrange

from qkv.dtypes import INPUT_DTYPES, max_finite, round_down, round_up, saturate
from qkv.errors import DeviceError, DTypeError, ShapeError
from qkv.kernels.kmeans import gather_centroids
from qkv.format import AffineFormat
from qkv.kernels.packing import pack_codes, unpack_codes

# Scales and zero points use at most half of their format's range (one exponent of headroom), so
# rounding the zero point down can widen the scale without overflowing.
HEADROOM = 0.5


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


def row_multiplier(peak: torch.Tensor, q: AffineFormat) -> torch.Tensor | None:
    """Power of two per row N that brings ``peak`` [N] (largest scale or |zero|) into range: the
    least 2**e >= peak / limit (``limit``: half the scale format's largest finite value), e in
    [-126, 127], 1 for a zero row. Computed from the exponent bits (frexp), so every device and the
    Triton kernel get the same e (a rounded log2 may not)."""
    if q.scale == "fp32":
        return None
    ratio = exact_div(peak, max_finite(q.scale_dtype) * HEADROOM)
    mantissa, exponent = torch.frexp(ratio)
    exponent = exponent - (mantissa == 0.5).int()  # an exact power of two is its own bound
    exponent = torch.where(ratio > 0, exponent, -126).clamp(-126, 127)  # a quotient that underflowed: the least
    return torch.where(peak > 0, exponent, 0).float().exp2()


def exact_div(x: torch.Tensor, value: float) -> torch.Tensor:
    """``x / value`` correctly rounded on every device (on CUDA, dividing by a Python scalar
    multiplies by its rounded reciprocal instead)."""
    return x / torch.full((), value, dtype=x.dtype, device=x.device)


def block_peaks(blocks: torch.Tensor, q: AffineFormat) -> torch.Tensor:
    """Largest value each block needs in the scale format (its scale or |zero point|): [N, R, G]."""
    if q.has_zero:
        low, high = blocks.amin(-1), blocks.amax(-1)
        return torch.maximum(exact_div(high - low, q.steps), low.abs())
    return exact_div(blocks.abs().amax(-1), q.steps)


def block_params(blocks: torch.Tensor, q: AffineFormat):
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


def check_quantize_args(x: torch.Tensor, q: AffineFormat, centroids, assignments) -> None:
    """Raise a typed error unless rows ``x`` [N, R, L] and the stages' ``centroids`` /
    ``assignments`` fit ``q``.

    x: fp32/fp16/bf16, L a multiple of the block. Token axis: x is [N, S, D]; channel axis: x is
    [N, D, S]. Every stage needs centroids [N, C, D] (fp32/fp16/bf16) and assignments [N, S]
    (integer) on x's device. Shapes and dtypes only: assignments are not range-checked (that
    would read them).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ShapeError(f"quantize_pack: x must be rows [N, R, L], got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in INPUT_DTYPES:
        raise DTypeError(f"quantize_pack: x has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if len(centroids) != len(assignments):
        raise ShapeError(
            f"quantize_pack: {len(centroids)} stages of centroids but {len(assignments)} of assignments"
        )
    n, r, length = x.shape
    if length % q.block:
        raise ShapeError(f"int{q.bits}: block {q.block} does not divide row length {length}")
    s, d = (r, length) if q.axis == "token" else (length, r)
    for t, (c, a) in enumerate(zip(centroids, assignments)):
        if c.dim() != 3 or c.shape[0] != n or c.shape[2] != d or c.shape[1] == 0:
            raise ShapeError(
                f"quantize_pack: stage {t} centroids have shape {tuple(c.shape)}, expected [{n}, C, {d}] "
                f"(C >= 1) for {q.axis}-axis rows of shape {tuple(x.shape)}"
            )
        if tuple(a.shape) != (n, s):
            raise ShapeError(
                f"quantize_pack: stage {t} assignments have shape {tuple(a.shape)}, expected [{n}, {s}] "
                f"for {q.axis}-axis rows of shape {tuple(x.shape)}"
            )
        if c.dtype not in INPUT_DTYPES:
            raise DTypeError(f"quantize_pack: stage {t} centroids have dtype {c.dtype}; supported: "
                             "float32, float16, bfloat16")
        if a.dtype.is_floating_point or a.dtype.is_complex or a.dtype == torch.bool:
            raise DTypeError(f"quantize_pack: stage {t} assignments have dtype {a.dtype}; expected an integer dtype")
        if c.device != x.device or a.device != x.device:
            raise DeviceError(
                f"quantize_pack: x is on {x.device}, stage {t} centroids on {c.device} and assignments "
                f"on {a.device}"
            )


def residual_rows(x: torch.Tensor, q: AffineFormat, centroids, assignments) -> torch.Tensor:
    """fp32 rows ``x - sum_t centroids[t][assignments[t]]``: x promoted to fp32, then each stage's
    centroids (their fp32 values) subtracted in order (rows are tokens or, for the channel axis,
    channels)."""
    out = x.float()
    for cents, assign in zip(centroids, assignments, strict=True):
        gathered = gather_centroids(cents, assign)
        out = out - (gathered if q.axis == "token" else gathered.transpose(1, 2))
    return out


def quantize_pack_torch(
    x: torch.Tensor,
    q: AffineFormat,
    centroids: Sequence[torch.Tensor] = (),
    assignments: Sequence[torch.Tensor] = (),
) -> QuantizedRows:
    """Quantize rows ``x - sum_t centroids[t][assignments[t]]`` in blocks along L and pack the codes.

    x: rows [N, R, L] (fp32/fp16/bf16; computed in fp32). centroids[t]: [N, C_t, D] (stored format),
    assignments[t]: [N, S] integer, one pair per stage (see :func:`residual_rows`); none by
    default, so x itself is quantized.
    """
    check_quantize_args(x, q, centroids, assignments)
    x = residual_rows(x, q, centroids, assignments)
    blocks = rearrange(x, "n r (g b) -> n r g b", b=q.block)
    scales, zeros, mult, scale_f, zero_f = block_params(blocks, q)
    scale_f, zero_f = scale_f.unsqueeze(-1), zero_f.unsqueeze(-1) if q.has_zero else zero_f
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    # The stored grid covers every block, so the clamp only absorbs fp32 rounding of x / scale.
    codes = torch.round((blocks - zero_f) / safe + q.offset).clamp(0, q.levels - 1)
    codes = torch.where(scale_f > 0, codes, torch.full_like(codes, math.floor(q.offset)))
    codes = rearrange(codes.to(torch.uint8), "n r g b -> n r (g b)")
    return QuantizedRows(pack_codes(codes, q.bits, q.pack), scales, zeros, mult)


def dequantize_rows_torch(
    rows: QuantizedRows, q: AffineFormat, length: int
) -> torch.Tensor:
    """Unpack and dequantize to fp32 rows [N, R, length]."""
    codes = unpack_codes(rows.codes, q.bits, length, q.pack).float()
    m = rows.mult.view(-1, 1, 1) if rows.mult is not None else 1.0
    scale = (rows.scales.float() * m).repeat_interleave(q.block, dim=-1)
    out = (codes - q.offset) * scale
    if rows.zeros is not None:
        out = out + (rows.zeros.float() * m).repeat_interleave(q.block, dim=-1)
    return out


def dequantize_torch(
    rows: QuantizedRows,
    q: AffineFormat,
    tokens: int,
    centroids: list[torch.Tensor],
    assignments: list[torch.Tensor],
    out_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unpack, dequantize and add back every stage's centroids: [N, tokens, D] in ``out_dtype``
    (computed in fp32, rounded once at the end), written into ``out`` when given.

    centroids[t]: [N, C_t, D] (stored format); assignments[t]: [N, tokens] integer.
    """
    if q.axis == "token":
        rec = dequantize_rows_torch(rows, q, rows_dim(rows, q))
    else:
        rec = rearrange(dequantize_rows_torch(rows, q, tokens), "n d s -> n s d")
    for cents, assign in zip(centroids, assignments, strict=True):
        rec = rec + gather_centroids(cents, assign)
    return saturate(rec, out_dtype) if out is None else out.copy_(saturate(rec, out_dtype))


def rows_dim(rows: QuantizedRows, q: AffineFormat) -> int:
    """D, the length of a dequantized row (the head dimension)."""
    return rows.scales.shape[-1] * q.block if q.axis == "token" else rows.codes.shape[1]
