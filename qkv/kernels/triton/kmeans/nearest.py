"""The k-means assignment's building blocks: centroids prepared once a call and the nearest of
them for a tile of tokens, shared by the assignment (:mod:`.assign`) and the assignment that also
sums (:mod:`.sums`).

Distances are ``||c||^2 - 2 x.c`` to the centroids *rounded to bf16* (the precision QVG stores
them in), so one bf16 tensor-core product per tile is exact for bf16 tokens (fp16/fp32 tokens are
split into a high and a low bf16 part: two products, ~16 significant bits of x). The rounded
centroids, pre-scaled by -2, and their squared norms are prepared once per call, not per tile,
padded to whole tiles. The running minimum is kept per (token, tile column) and reduced across
columns once per program. Tokens are read in their own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.triton.bits import bf16_dot, round_to_bf16, split_bf16
from qkv.kernels.triton.tiles import multiprocessors


@triton.jit
def _prepare_kernel(c_ptr, neg2_ptr, csq_ptr, M, C, CP, D, EMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Centroid rows [N, C, D] -> -2 * (rounded to bf16) and the rounded rows' squared norms (fp32),
    each row of centroids padded to CP with zeros of norm +inf, which are never nearest."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    k = m % CP
    real = (m < M) & (k < C)
    mask = real[:, None] & (d < D)[None, :]
    c = tl.load(c_ptr + ((m // CP) * C + k)[:, None].to(tl.int64) * D + d[None, :], mask=mask, other=0.0)
    c = c.to(tl.float32)
    if EMULATE:
        c = round_to_bf16(c)  # the interpreter's conversion truncates
    else:
        c = c.to(tl.bfloat16).to(tl.float32)
    out = (m < M)[:, None] & (d < D)[None, :]
    tl.store(neg2_ptr + m[:, None].to(tl.int64) * D + d[None, :], (c * -2.0).to(tl.bfloat16), mask=out)
    tl.store(csq_ptr + m, tl.where(real, tl.sum(c * c, axis=1), float("inf")), mask=m < M)


@triton.jit
def _peak_bits(x, top):
    """``top`` (int32 [BLOCK_S]) raised to the max |x| of each token of the tile ``x``
    [BLOCK_S, BLOCK_D] as loaded (fp32, fp16 or bf16), as the bits of |x| in its own dtype: for
    floats >= 0 the order of their bits as integers is theirs, with NaN above +inf, so NaN and Inf
    propagate with no compare of their own (16-bit tokens are compared as they are loaded, before
    any conversion)."""
    if x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        bits = (x.to(tl.int16, bitcast=True) & 0x7FFF).to(tl.int32)
    return tl.maximum(top, tl.max(bits, axis=1))


def peaks_from_bits(top: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each row's max |x| ([N] fp32, NaN and Inf propagating) from its programs' :func:`_peak_bits`
    [N, P] int32 of tokens of ``dtype``."""
    bits = top.amax(-1)
    if dtype == torch.float32:
        return bits.view(torch.float32)
    return bits.to(torch.int16).view(dtype).float()


@triton.jit
def _centroid_tile(cents, D: tl.constexpr, d):
    """A tile of prepared centroids (-2 x, bf16) at ``cents``, transposed [BLOCK_D, BLOCK_C], fp32."""
    if D == d.shape[0]:
        cent = tl.load(cents)
    else:
        cent = tl.load(cents, mask=(d < D)[:, None], other=0.0)
    return cent.to(tl.float32)


@triton.jit
def _distances(xh, xl, f, cent, norm, X_EXACT: tl.constexpr, EMULATE: tl.constexpr):
    """|c|^2 - 2 f (x . c) of a token tile (as bf16 parts xh + xl) and a centroid tile ``cent``
    (-2 c, [BLOCK_D, BLOCK_C]), ``norm`` the centroids' |c|^2: [BLOCK_S, BLOCK_C]."""
    dist = bf16_dot(xh, cent, EMULATE)
    if not X_EXACT:
        dist += bf16_dot(xl, cent, EMULATE)
    return dist * f + norm[None, :]


@triton.jit
def _nearest(x, f, c_ptr, csq_ptr, n, CP, D: tl.constexpr, d, X_EXACT: tl.constexpr, EMULATE: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """Each token of the tile x [BLOCK_S, BLOCK_D] fp32 (as loaded; times the row's factor f):
    its nearest of row n's CP prepared centroids (a multiple of BLOCK_C, padded by _prepare_kernel
    to CP + BLOCK_C a row), (index int32, squared distance)."""
    # the row's factor (a power of two) scales the products after the tensor cores, so the tokens
    # reach them as loaded: f (x . c) is (f x) . c exactly, barring overflow and underflow
    x_sq = tl.sum((x * f) * (x * f), axis=1)
    xh, xl = split_bf16(x, X_EXACT)
    # the running minimum is kept per (token, column of the centroid tile), with the tile it came
    # from, and reduced across columns once after the loop: no cross-thread reduction per tile
    j = tl.arange(0, BLOCK_C)
    run = tl.full((x.shape[0], BLOCK_C), float("inf"), tl.float32)
    run_c0 = tl.zeros((x.shape[0], BLOCK_C), tl.int32)
    # -2 * centroid, bf16, loaded transposed: [BLOCK_D, BLOCK_C]; padded rows need no mask
    cents = c_ptr + n * (CP + BLOCK_C) * D + j[None, :] * D + d[:, None]
    norms = csq_ptr + n * (CP + BLOCK_C) + j
    norm = tl.load(norms)
    for c0 in range(0, CP, BLOCK_C):
        # the next tile's norms are loaded a tile ahead (the row's padding has one tile more)
        norms += BLOCK_C
        norm_next = tl.load(norms)
        dist = _distances(xh, xl, f, _centroid_tile(cents, D, d), norm, X_EXACT, EMULATE)
        norm = norm_next
        cents += BLOCK_C * D
        # ties keep the earlier (lower-index) centroid; the comparison is used once (a predicate a
        # value, not one kept for two selects: ptxas packs those into registers when they run out)
        run_c0 = tl.where(dist < run, c0, run_c0)
        run = tl.minimum(run, dist)
    best = tl.min(run, axis=1)
    # of the columns at the minimum, the lowest centroid index (each column holds its first)
    best_i = tl.min(tl.where(run == best[:, None], run_c0 + j[None, :], CP), axis=1)
    return best_i, tl.maximum(best + x_sq, 0.0)


def unit_d(x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, S, D] as the kernels read it, with any strides along N and S (a slice of a longer
    buffer, keys and values stacked as one view: nothing copied) and unit stride along D (a copy
    otherwise)."""
    return x if x.stride(2) == 1 else x.contiguous()


def _slots(x: torch.Tensor, waves: int) -> int:
    """Programs for ``waves`` a multiprocessor of ``x``'s GPU (``waves`` off a GPU)."""
    return waves * (multiprocessors(x.device.index or 0) if x.is_cuda else 1)
