"""The k-means assignment, Triton twin of :func:`qkv.kernels.kmeans.assign_torch`: the nearest
centroid without materializing the [S, C] distance matrix (:mod:`.nearest`: centroid tiles
stream through on-chip). Where a row's centroids fit one tile of at most RESIDENT_MAX_VALUES and
the tile asks for it (``AssignTile.waves``), a program keeps them on chip and walks token tiles
instead: the centroids are read once a program, not once a token tile. With ``sums=True``, up to
FUSED_MAX_CLUSTERS clusters, the same pass sums each cluster's tokens as the one-hot update does
(:mod:`.sums`, ``_cluster_sum_kernel`` with ASSIGN): one read of the tokens per Lloyd iteration.

Agreement with the fp32 reference: the kernel returns the nearest of the rounded centroids (up to
fp32 summation order); its true distance exceeds the minimum by at most the rounding's effect,
``2^-7 * |c|max * (|x| + |c|max)`` (see docs/kernels.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.triton.bits import split_bf16
from qkv.kernels.triton.kmeans.nearest import (_centroid_tile, _distances, _nearest, _peak_bits, _prepare_kernel, _slots,
                                               peaks_from_bits, unit_d)
from qkv.kernels.triton.kmeans.sums import _cluster_sum_kernel, _empty_sums, _parts, _splits
from qkv.kernels.triton.tiles import AssignSumsTile, AssignTile, tile_for


# The most clusters whose sums the assignment gathers in the same pass (sums=True; the kernel
# holds up to 64, their [clusters, head dim] fp32 sums in a program's registers). Since the
# assignment keeps its minima per tile column (bench_lloyd_step_column_minima_h100.json, H100)
# one pass takes 0.64-0.72x the two passes' time at 16 and 32 clusters on a SANA-WM pass and a
# LongCat span and 0.90-0.93x at 64, and 0.76-0.77x on the small Self-Forcing and AnyFlow-FAR
# chunks at every count; before, one pass lost at 32 and 64 on the two large shapes
# (bench_lloyd_step_before_column_minima_h100.json)
FUSED_MAX_CLUSTERS = 64
# The most centroid values (clusters x padded head dim) a program of the assignment keeps on chip
# while it walks a row's token tiles (AssignTile.waves): 64 KB of bf16, 256 clusters of 128 dims
RESIDENT_MAX_VALUES = 32768


@triton.jit
def _assign_kernel(
    x_ptr, f_ptr, c_ptr, csq_ptr, idx_ptr, dist_ptr, top_ptr, S, CP, D: tl.constexpr, XN, XS,
    X_EXACT: tl.constexpr, HAS_SCALE: tl.constexpr, EMULATE: tl.constexpr, PEAKS: tl.constexpr,
    REDO: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The nearest of row n's centroids (CP, in tiles) for one token tile; PEAKS: the tile's max
    |x| (as bits, see _peak_bits) into top[n, tile]; REDO: only rows whose factor is not 1."""
    n = tl.program_id(0).to(tl.int64)
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    if REDO:
        if f != 1.0:
            _assign_tile(x_ptr, f, c_ptr, csq_ptr, idx_ptr, dist_ptr, top_ptr, n, S, CP, D, XN, XS, X_EXACT,
                         EMULATE, PEAKS, BLOCK_S, BLOCK_C, BLOCK_D)
    else:
        _assign_tile(x_ptr, f, c_ptr, csq_ptr, idx_ptr, dist_ptr, top_ptr, n, S, CP, D, XN, XS, X_EXACT, EMULATE,
                     PEAKS, BLOCK_S, BLOCK_C, BLOCK_D)


@triton.jit
def _assign_tile(x_ptr, f, c_ptr, csq_ptr, idx_ptr, dist_ptr, top_ptr, n, S, CP, D: tl.constexpr, XN, XS,
                 X_EXACT: tl.constexpr, EMULATE: tl.constexpr, PEAKS: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    x = tl.load(x_ptr + n * XN + s[:, None].to(tl.int64) * XS + d[None, :],
                mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    if PEAKS:
        tl.store(top_ptr + n * tl.num_programs(1) + tl.program_id(1),
                 tl.max(_peak_bits(x, tl.zeros((BLOCK_S,), tl.int32)), axis=0))
    best_i, best = _nearest(x.to(tl.float32), f, c_ptr, csq_ptr, n, CP, D, d, X_EXACT, EMULATE, BLOCK_C)
    tl.store(idx_ptr + n * S + s, best_i.to(tl.int64), mask=s_ok)
    tl.store(dist_ptr + n * S + s, best, mask=s_ok)


@triton.jit
def _assign_resident_kernel(
    x_ptr, f_ptr, c_ptr, csq_ptr, idx_ptr, dist_ptr, top_ptr, S, CP, D: tl.constexpr, XN, XS, TILES,
    X_EXACT: tl.constexpr, HAS_SCALE: tl.constexpr, EMULATE: tl.constexpr, PEAKS: tl.constexpr,
    REDO: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_assign_kernel for a row whose CP prepared centroids are one tile (CP == BLOCK_C, prepared
    without the tiled kernel's extra tile): the program loads them once and walks the row's token
    tiles p, p + P, ... (P programs a row), so the centroids are read once a program instead of
    once a token tile, and the token loads are pipelined across tiles (for rows of factor 1: see
    below). PEAKS: the max |x| of the program's tiles into top[n, p]; REDO: as _assign_kernel."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_C)
    centroids = c_ptr + n * CP * D + j[None, :] * D + d[:, None]
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    # every row in the safe range has the factor 1: its loop takes the tokens' squared norms with 1
    # for it, compiled in (no multiply a value); rows outside the range (rare) take a copy of the
    # loop without software pipelining, whose buffers would not share the pipelined copy's shared
    # memory (two programs a multiprocessor would no longer fit)
    if REDO:  # the rows of factor 1 load nothing
        if f != 1.0:
            _resident_tiles(x_ptr, f, f, _centroid_tile(centroids, D, d), tl.load(csq_ptr + n * CP + j), idx_ptr,
                            dist_ptr, top_ptr, n, S, CP, D, XN, XS, TILES, d, j, X_EXACT, EMULATE, PEAKS, BLOCK_S, 1)
    else:
        cent = _centroid_tile(centroids, D, d)
        norm = tl.load(csq_ptr + n * CP + j)
        if f == 1.0:
            _resident_tiles(x_ptr, f, 1.0, cent, norm, idx_ptr, dist_ptr, top_ptr, n, S, CP, D, XN, XS, TILES, d,
                            j, X_EXACT, EMULATE, PEAKS, BLOCK_S, None)
        else:
            _resident_tiles(x_ptr, f, f, cent, norm, idx_ptr, dist_ptr, top_ptr, n, S, CP, D, XN, XS, TILES, d, j,
                            X_EXACT, EMULATE, PEAKS, BLOCK_S, 1)


@triton.jit
def _resident_tiles(x_ptr, f, f_sq, cent, norm, idx_ptr, dist_ptr, top_ptr, n, S, CP, D: tl.constexpr, XN, XS,
                    TILES, d, j, X_EXACT: tl.constexpr, EMULATE: tl.constexpr, PEAKS: tl.constexpr,
                    BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """_assign_resident_kernel's walk over row n's token tiles (STAGES: its software pipelining,
    None for the launch's), the row's factor ``f`` (``f_sq``: the same, for the squared norms;
    the products take the runtime value either way, so both copies round them alike)."""
    top = tl.zeros((BLOCK_S,), tl.int32)
    for t in tl.range(tl.program_id(1), TILES, tl.num_programs(1), num_stages=STAGES):
        s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        x = tl.load(x_ptr + n * XN + s[:, None].to(tl.int64) * XS + d[None, :],
                    mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
        if PEAKS:
            top = _peak_bits(x, top)
        x = x.to(tl.float32)
        x_sq = tl.sum((x * f_sq) * (x * f_sq), axis=1)
        xh, xl = split_bf16(x, X_EXACT)
        dist = _distances(xh, xl, f, cent, norm, X_EXACT, EMULATE)
        best = tl.min(dist, axis=1)
        # ties keep the lowest centroid index, as in _nearest; a token of NaN distances (NaN in x:
        # refused by the value check, which may read its verdict after the encode) takes 0, an
        # index in range like everything the encode goes on to gather
        best_i = tl.min(tl.where(dist == best[:, None], j[None, :], CP), axis=1)
        best_i = tl.where(best_i < CP, best_i, 0)
        tl.store(idx_ptr + n * S + s, best_i.to(tl.int64), mask=s_ok)
        tl.store(dist_ptr + n * S + s, tl.maximum(best + x_sq, 0.0), mask=s_ok)
    if PEAKS:
        tl.store(top_ptr + n * tl.num_programs(1) + tl.program_id(1), tl.max(top, axis=0))


def assign_supports(x, centroids, scale=None, sums=False, peaks=False, redo=None) -> str | None:
    if x.shape[-1] > 256:
        return f"D={x.shape[-1]} is larger than 256"
    return None


def assign_triton(
    x: torch.Tensor, centroids: torch.Tensor, scale: torch.Tensor | None = None, sums: bool = False,
    peaks: bool = False, redo: tuple | None = None, *, tile: AssignTile | None = None,
    sum_tile: AssignSumsTile | None = None,
) -> tuple:
    """Triton twin of :func:`qkv.kernels.kmeans.assign_torch`: nearest of the centroids rounded
    to bf16 (see the module docstring); ``scale`` multiplies each token as it is loaded. With
    ``sums``, up to FUSED_MAX_CLUSTERS clusters of at most 128 dims, the clusters' sums come from
    the same pass (``_cluster_sum_kernel`` with ASSIGN); beyond, the third element is None.
    ``peaks`` and ``redo``: as in the reference (the peaks from each program's tokens, the rows of
    factor 1 skipped by their programs, in ``redo``'s buffers). ``tile``: the launch of the plain
    assignment, ``sum_tile`` of the one that sums (default: the device's, see
    :mod:`qkv.kernels.triton.tiles`)."""
    x, centroids = unit_d(x), centroids.float().contiguous()
    n, s, d = x.shape
    c = centroids.shape[1]
    block_d = max(16, triton.next_power_of_2(d))
    fused = sums and c <= FUSED_MAX_CLUSTERS and block_d <= 128
    if fused:
        sum_tile = sum_tile or tile_for("assign_sums", x.device, c)
        block_c = max(16, triton.next_power_of_2(c))
    else:
        # the table's rows count clusters of up to 128 dims (wider centroids take more room on chip)
        tile = tile or tile_for("assign", x.device, c * max(1, block_d // 128))
        block_c = min(tile.clusters, max(16, triton.next_power_of_2(c)))
    cp = triton.cdiv(c, block_c) * block_c  # whole centroid tiles
    resident = not fused and tile.waves and cp == block_c and block_c * block_d <= RESIDENT_MAX_VALUES
    rows = cp if resident else cp + block_c  # the tiled kernel loads its norms a tile ahead
    neg2 = torch.empty(n, rows, d, dtype=torch.bfloat16, device=x.device)  # -2 * rounded: exact
    c_sq = torch.empty(n, rows, dtype=torch.float32, device=x.device)
    _prepare_kernel[(triton.cdiv(n * rows, 32),)](
        centroids, neg2, c_sq, n * rows, c, rows, d, EMULATE=x.device.type != "cuda", BLOCK_M=32, BLOCK_D=block_d,
    )
    if redo is None:
        idx = torch.empty(n, s, dtype=torch.int64, device=x.device)
        dist = torch.empty(n, s, dtype=torch.float32, device=x.device)
    else:
        idx, dist = redo[:2]
    f = x if scale is None else scale.float().contiguous()
    common = dict(X_EXACT=x.dtype == torch.bfloat16, HAS_SCALE=scale is not None, EMULATE=x.device.type != "cuda",
                  PEAKS=peaks, REDO=redo is not None)
    if fused:
        splits, per_split = _splits(x, n, s, sum_tile)
        part = _empty_sums(x, splits, c) if redo is None else redo[2]
        top = torch.empty(n, splits, dtype=torch.int32, device=x.device) if peaks else x
        _cluster_sum_kernel[(n, 1, splits)](
            x, f, idx, neg2, c_sq, dist, part.sums, part.counts, top, s, c, d, x.stride(0), x.stride(1), per_split,
            ASSIGN=True, PARTS=_parts(x), BLOCK_T=sum_tile.tokens, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=sum_tile.warps, **common,
        )
        return (idx, dist, part) + ((peaks_from_bits(top, x.dtype),) if peaks else ())
    block_s = tile.tokens if block_d <= 128 else tile.tokens // 2
    tiles = triton.cdiv(s, block_s)
    launch = dict(BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=tile.warps, num_stages=tile.stages,
                  **common)
    # whole rounds of programs: one more a row past the GPU's slots would run as a second round
    programs = max(1, min(tiles, _slots(x, tile.waves) // n)) if resident else tiles
    top = torch.empty(n, programs, dtype=torch.int32, device=x.device) if peaks else x
    if resident:
        _assign_resident_kernel[(n, programs)](
            x, f, neg2, c_sq, idx, dist, top, s, cp, d, x.stride(0), x.stride(1), tiles, **launch)
    else:
        _assign_kernel[(n, tiles)](x, f, neg2, c_sq, idx, dist, top, s, cp, d, x.stride(0), x.stride(1), **launch)
    return (idx, dist) + ((None,) if sums else ()) + ((peaks_from_bits(top, x.dtype),) if peaks else ())
