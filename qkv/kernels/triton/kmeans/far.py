"""The far tokens a Lloyd step re-seeds empty clusters with, Triton twin of
:func:`qkv.kernels.kmeans.far_tokens_torch`: the peak of each of a row's segments of distances as
a key, many programs a row; then each key's rank among its row's by counting the larger ones,
the tokens ranked below C written to their places (two launches; no sort). Bit-exact. Given the
clusters' sizes, a row without an empty cluster (from a Lloyd step's third on, nearly every row:
benchmarks/empty_clusters.py) skips both and gets -1s.
And the re-seeding, twin of :func:`qkv.kernels.kmeans.reseed_torch`: a program per empty cluster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.kmeans import far_segments
from qkv.kernels.triton.kmeans.nearest import unit_d


# The far tokens: the most tokens a segment (one load of a program); the keys a program of the
# ranking ranks, against FAR_RANK_STEP of the row's keys a step on FAR_RANK_WARPS warps (compiled
# for sm_90 by Triton 3.6: 72 registers a thread, no spills; 128 keys a step spill)
FAR_MAX_SEGMENT = 16384
FAR_RANK_TILE = 128
FAR_RANK_STEP = 32
FAR_RANK_WARPS = 8


@triton.jit
def _needed(cnt_ptr, n, C, HAS_COUNTS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Whether row n needs far tokens: one of its C clusters is empty (always, without counts)."""
    need = True
    if HAS_COUNTS:
        j = tl.arange(0, BLOCK_C)
        need = tl.min(tl.load(cnt_ptr + n * C + j, mask=j < C, other=1.0), axis=0) == 0
    return need


@triton.jit
def _segment_peak_kernel(d_ptr, key_ptr, cnt_ptr, S, size, segments, C, HAS_COUNTS: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """The peaks of BLOCK_G segments of ``size`` tokens of row program_id(0) of dist [N, S] (>= 0),
    a key a segment that sorts as far_tokens_torch ranks them: the peak's bits (-0 as 0) above the
    peak token's distance from 2**31 - 1 (equal peaks: the lowest token first; within a segment
    the first of equal distances). Nothing for a row that needs no far token (_needed)."""
    n = tl.program_id(0).to(tl.int64)
    if _needed(cnt_ptr, n, C, HAS_COUNTS, BLOCK_C):
        _segment_peaks(d_ptr, key_ptr, n, S, size, segments, BLOCK_G, BLOCK_T)


@triton.jit
def _segment_peaks(d_ptr, key_ptr, n, S, size, segments, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """_segment_peak_kernel's keys of row n."""
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    t = tl.arange(0, BLOCK_T)
    ok = (g < segments)[:, None] & (t < size)[None, :]
    v = tl.load(d_ptr + n * S + g[:, None] * size + t[None, :], mask=ok, other=float("-inf"))
    # a NaN distance (NaN in x, which the value check refuses, perhaps after the encode) counts as
    # the farthest, so the peak's index is always a token of the segment
    v = tl.where(v == v, v, float("inf"))
    peak, at = tl.max(v, axis=1, return_indices=True, return_indices_tie_break_left=True)
    bits = tl.where(peak == 0.0, 0, peak.to(tl.int32, bitcast=True))
    key = (bits.to(tl.int64) << 32) | (2147483647 - (g * size + at)).to(tl.int64)
    tl.store(key_ptr + n * segments + g, key, mask=g < segments)


@triton.jit
def _rank_segments_kernel(key_ptr, out_ptr, cnt_ptr, segments, k, C, HAS_COUNTS: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """BLOCK_R segment keys of row program_id(0): each one's rank among the row's keys (how many
    are larger: the keys are distinct), and the tokens of those ranked below k to out[n, rank]
    (a rank by counting, many programs a row, instead of one program's sort); -1 to its places
    out[n, g] of the row's first k for a row that needs no far token (_needed)."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    if _needed(cnt_ptr, n, C, HAS_COUNTS, BLOCK_C):
        _rank_segments(key_ptr, out_ptr, n, g, segments, k, BLOCK_R, BLOCK_H)
    else:
        tl.store(out_ptr + n * k + g, tl.full((BLOCK_R,), -1, tl.int64), mask=g < k)


@triton.jit
def _rank_segments(key_ptr, out_ptr, n, g, segments, k, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """_rank_segments_kernel's ranking of the keys ``g`` of row n."""
    mine = tl.load(key_ptr + n * segments + g, mask=g < segments, other=-1)
    larger = tl.zeros((BLOCK_R, BLOCK_H), tl.int32)
    h = tl.arange(0, BLOCK_H)
    for h0 in range(0, segments, BLOCK_H):
        other = tl.load(key_ptr + n * segments + h0 + h, mask=h0 + h < segments, other=-1)
        larger += (other[None, :] > mine[:, None]).to(tl.int32)
    rank = tl.sum(larger, axis=1)
    tl.store(out_ptr + n * k + rank, 2147483647 - (mine & 4294967295), mask=(g < segments) & (rank < k))


@triton.jit
def _reseed_kernel(x_ptr, f_ptr, far_ptr, cnt_ptr, means_ptr, XN, XS, C, D, K, HAS_SCALE: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Cluster program_id(1) of row program_id(0), if it is empty: the j-th empty cluster of the
    row takes the token far[n, min(j, K - 1)] of x (times the row's factor: HAS_SCALE), written
    over its mean."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if tl.load(cnt_ptr + n * C + c) == 0:
        j = tl.arange(0, BLOCK_C)
        size = tl.load(cnt_ptr + n * C + j, mask=j < C, other=1.0)
        rank = tl.minimum(tl.sum(((size == 0) & (j < c)).to(tl.int32), axis=0), K - 1)
        tok = tl.load(far_ptr + n * K + rank)
        d = tl.arange(0, BLOCK_D)
        out = tl.load(x_ptr + n * XN + tok.to(tl.int64) * XS + d, mask=d < D, other=0.0).to(tl.float32)
        if HAS_SCALE:
            out = out * tl.load(f_ptr + n)
        tl.store(means_ptr + (n * C + c) * D + d, out, mask=d < D)


def far_tokens_supports(dist, k, per_pick, counts=None) -> str | None:
    size, _ = far_segments(dist.shape[1], k, per_pick)
    if triton.next_power_of_2(size) > FAR_MAX_SEGMENT:
        return f"segments of {size} tokens are longer than a load ({FAR_MAX_SEGMENT})"
    return None


def far_tokens_triton(dist: torch.Tensor, k: int, per_pick: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.kmeans.far_tokens_torch`: the segments' peaks as sortable
    int64 keys (one pass over ``dist``, many programs a row), then each key's rank among its row's
    by counting the larger ones (many programs a row; a one-program bitonic top-k of a LongCat
    row's 1,058 keys took 0.030 ms on an H100): two launches, no sort; with ``counts``, each
    program of a row with no empty cluster stops after reading the row's sizes."""
    dist = dist.contiguous()
    n, s = dist.shape
    size, segments = far_segments(s, k, per_pick)
    keys = torch.empty(n, segments, dtype=torch.int64, device=dist.device)
    c = 1 if counts is None else counts.shape[1]
    cnt = dist if counts is None else counts.float().contiguous()
    guard = dict(HAS_COUNTS=counts is not None, BLOCK_C=triton.next_power_of_2(c))
    block_t = triton.next_power_of_2(size)
    block_g = max(1, min(triton.next_power_of_2(segments), 4096 // block_t))
    _segment_peak_kernel[(n, triton.cdiv(segments, block_g))](dist, keys, cnt, s, size, segments, c, **guard,
                                                              BLOCK_G=block_g, BLOCK_T=block_t, num_warps=4)
    out = torch.empty(n, k, dtype=torch.int64, device=dist.device)
    _rank_segments_kernel[(n, triton.cdiv(segments, FAR_RANK_TILE))](
        keys, out, cnt, segments, k, c, **guard, BLOCK_R=FAR_RANK_TILE, BLOCK_H=FAR_RANK_STEP, num_warps=FAR_RANK_WARPS)
    return out


def reseed_supports(means, counts, x, far, scale=None) -> str | None:
    return None if means.is_contiguous() else "the means are not contiguous (written in place)"


def reseed_triton(means: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, far: torch.Tensor,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.kmeans.reseed_torch` (bit-exact): a program a cluster, the
    empty ones gathering their token; in place."""
    x = unit_d(x)
    n, c, d = means.shape
    _reseed_kernel[(n, c)](
        x, x if scale is None else scale.float().contiguous(), far.contiguous(), counts.float().contiguous(), means,
        x.stride(0), x.stride(1), c, d, far.shape[1], HAS_SCALE=scale is not None,
        BLOCK_C=triton.next_power_of_2(c), BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=1,
    )
    return means
