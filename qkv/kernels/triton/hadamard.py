"""Triton normalized Walsh-Hadamard transform, twin of qkv/kernels/hadamard.py.

Tiles of many rows are multiplied by the +-1 Sylvester matrix, generated in registers
(H[i, j] = (-1)^popcount(i & j)), on bf16 tensor cores (``bits.hadamard_dot``) with the rows
split into high and low bf16 parts (H is exact in bf16; ~2^-16 relative rounding). A decoding
step's few rows get a program each, which sums +-x in fp32 through the Kronecker factors of H
(``bits.hadamard_sums``: D (A + B) products a row instead of D^2), so that every row's short
program runs at once. Either way the result is divided by sqrt(D) and rounded to nearest in the
rows' dtype; it differs from the butterfly reference by the summation order (and the split). The
attention kernels rotate fp16/bf16 queries against rotated keys with it, in one launch and
without an fp32 copy of the rows or of the result.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkv.kernels.triton.bits import hadamard_dot, hadamard_sums, round_to_bf16
from qkv.kernels.triton.launch import Launcher

ROW_PROGRAMS = 256  # up to this many rows (one query, batch 8, 32 heads), a program a row
TILE_MAX_D = 128  # tensor-core tiles up to this D; a program a row beyond


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
def _hadamard_kernel(x_ptr, out_ptr, M, SQRT_D: tl.constexpr, D: tl.constexpr,
                     EMULATE: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = x H / sqrt(D) for BLOCK_M rows of D, rounded to nearest in out's dtype."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    m_ok = (m < M)[:, None]
    x = tl.load(x_ptr + m[:, None].to(tl.int64) * D + d[None, :], mask=m_ok, other=0.0).to(tl.float32)
    if BLOCK_M < 16:  # below a tensor-core tile: fp32 sums through the Kronecker factors
        y = tl.math.div_rn(hadamard_sums(x, D), SQRT_D)
    else:
        y = tl.math.div_rn(hadamard_dot(x, D, EMULATE), SQRT_D)
    at = m[:, None].to(tl.int64) * D + d[None, :]
    out_t = out_ptr.dtype.element_ty
    tl.store(out_ptr + at, _rounded(y, out_t == tl.bfloat16, EMULATE, out_t).to(out_t), mask=m_ok)


# the decode path rotates a step's queries with it, once per layer and generated token
launch_hadamard = Launcher(_hadamard_kernel)


def hadamard_supports(x) -> str | None:
    d = x.shape[-1]
    if d < 16 or d > 512 or d & (d - 1):
        return f"D={d}: the kernel needs a power of two in [16, 512]"
    return None


def hadamard_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.hadamard.hadamard_torch`: x's dtype in and out (computed
    in fp32, rounded once), contiguous, x's shape (D as :func:`hadamard_supports` allows)."""
    d = x.shape[-1]
    flat = x.reshape(-1, d).contiguous()
    out = torch.empty_like(flat)
    # a decoding step's queries: a program a row (its D^2 sums cut to D (A + B) by hadamard_sums),
    # so that every row's short program runs at once; more rows: tensor-core tiles, which hold the
    # D x D sign matrix and failed on an H100 at D = 512 (tested there up to 128)
    rows = flat.shape[0]
    block_m = 1 if rows <= ROW_PROGRAMS or d > TILE_MAX_D else 16 if rows <= 1024 else 64
    launch_hadamard[(-(-rows // block_m),)](
        flat, out, rows, SQRT_D=math.sqrt(d), D=d, EMULATE=x.device.type != "cuda", BLOCK_M=block_m,
    )
    return out.reshape(x.shape)
