"""Triton normalized Walsh-Hadamard transform, twin of qkv/kernels/hadamard.py.

A tile of rows is multiplied by the +-1 Sylvester matrix, generated in registers
(H[i, j] = (-1)^popcount(i & j)), on bf16 tensor cores with the rows split into high and low
bf16 parts (H is exact in bf16), then divided by sqrt(D). Differs from the butterfly reference by
the split's ~2^-16 relative rounding and the summation order. :func:`hadamard_split` rotates rows
of fp16/bf16 (attention queries against rotated keys) into two parts of their own dtype in one
launch, without an fp32 copy of the rows or of the result.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkv.kernels.triton.bits import bf16_dot, round_to_bf16, split_bf16


@triton.jit
def _rounded(y, BF16: tl.constexpr, EMULATE: tl.constexpr, OUT_T: tl.constexpr):
    """fp32 y rounded to nearest even in the output dtype OUT_T, as fp32 (bf16 on the bits under
    EMULATE: the interpreter's own conversion may truncate)."""
    if BF16 and EMULATE:
        r = round_to_bf16(y)
    else:
        r = y.to(OUT_T).to(tl.float32)
    return r


@triton.jit
def _hadamard_kernel(x_ptr, out_ptr, lo_ptr, M, SQRT_D: tl.constexpr, D: tl.constexpr,
                     EMULATE: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    """out = x H / sqrt(D) for BLOCK_M rows of D; SPLIT: out holds the result rounded to out's dtype
    and lo the rest, rounded likewise (out + lo is the fp32 result to ~2^-16 relative)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    m_ok = (m < M)[:, None]
    x = tl.load(x_ptr + m[:, None].to(tl.int64) * D + d[None, :], mask=m_ok, other=0.0).to(tl.float32)
    parity = d[:, None] & d[None, :]
    parity ^= parity >> 16
    parity ^= parity >> 8
    parity ^= parity >> 4
    parity ^= parity >> 2
    parity ^= parity >> 1
    h = tl.where((parity & 1) == 1, -1.0, 1.0)
    xh, xl = split_bf16(x, False)
    y = tl.math.div_rn(bf16_dot(xh, h, EMULATE) + bf16_dot(xl, h, EMULATE), SQRT_D)
    at = m[:, None].to(tl.int64) * D + d[None, :]
    out_t = out_ptr.dtype.element_ty
    if SPLIT:
        bf16 = out_t == tl.bfloat16
        hi = _rounded(y, bf16, EMULATE, out_t)
        tl.store(lo_ptr + at, _rounded(y - hi, bf16, EMULATE, out_t).to(out_t), mask=m_ok)
        y = hi
    tl.store(out_ptr + at, y.to(out_t), mask=m_ok)


def hadamard_supports(x) -> str | None:
    d = x.shape[-1]
    if d < 16 or d > 512 or d & (d - 1):
        return f"D={d}: the kernel needs a power of two in [16, 512]"
    return None


def _launch(x: torch.Tensor, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[-1]
    flat = x.reshape(-1, d).contiguous()
    out = torch.empty_like(flat)
    lo = torch.empty_like(flat) if split else out
    block_m = 64 if d <= 128 else 32
    _hadamard_kernel[(triton.cdiv(flat.shape[0], block_m),)](
        flat, out, lo, flat.shape[0], SQRT_D=math.sqrt(d), D=d,
        EMULATE=x.device.type != "cuda", BLOCK_M=block_m, SPLIT=split,
    )
    return out.reshape(x.shape), lo.reshape(x.shape)


def hadamard_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.hadamard.hadamard_torch` (fp32 in, same dtype out)."""
    return _launch(x, False)[0]


def hadamard_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H x / sqrt(D) of fp16/bf16 rows x [..., D] (D as :func:`hadamard_supports` allows) in two
    parts of x's dtype, high and low: the fp32 transform rounded to x's dtype, and the rest rounded
    likewise (their sum is the fp32 transform to ~2^-16 relative). One launch; twin of
    :func:`qkv.kernels.hadamard.hadamard_split_torch`."""
    return _launch(x, True)
