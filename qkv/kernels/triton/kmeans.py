"""Triton k-means kernels, twins of qkv/kernels/kmeans.py.

- assignment: nearest centroid without materializing the [S, C] distance matrix. Centroid tiles
  stream through on-chip; distances are ``||c||^2 - 2 x.c`` to the centroids *rounded to bf16*
  (the precision QVG stores them in), so one bf16 tensor-core product per tile is exact for bf16
  tokens (fp16/fp32 tokens are split into a high and a low bf16 part: two products, ~16
  significant bits of x). The rounded centroids, pre-scaled by -2, and their squared norms are
  prepared once per call, not per tile, padded to whole tiles. The running minimum is kept per
  (token, tile column) and reduced across columns once per program. Tokens are read in their
  own dtype. Where a row's centroids fit one tile of at most RESIDENT_MAX_VALUES and the tile
  asks for it (``AssignTile.waves``), a program keeps them on chip and walks token tiles instead:
  the centroids are read once a program, not once a token tile.
  With ``sums=True``, up to FUSED_MAX_CLUSTERS clusters, the same pass sums each cluster's tokens
  as the one-hot update does (``_cluster_sum_kernel`` with ASSIGN): one read of the tokens per
  Lloyd iteration.
  Agreement with the fp32 reference: the kernel returns the nearest of the rounded centroids (up
  to fp32 summation order); its true distance exceeds the minimum by at most the rounding's
  effect, ``2^-7 * |c|max * (|x| + |c|max)`` (see docs/kernels.md).
- update: deterministic, no floating-point atomics, two ways to the same sums. Up to
  ONEHOT_MAX_CLUSTERS clusters (two passes over the tokens), ``update_onehot`` sums each
  cluster's tokens as one-hot products on the tensor cores. With more, ``update_sorted`` orders
  the tokens by cluster (a stable sort of every row at once where row and cluster fit int16)
  and sums runs of RUN_TOKENS sorted tokens a program, as one-hot products over the few clusters
  a run holds; a cluster spanning several runs adds its parts in order.
  Empty clusters are re-seeded by the kernel that adds the parts. Results differ from the
  reference only by fp32 summation order, and are bit-identical from run to run.
  benchmarks/results/bench_kmeans_update_h200.json has both at the shapes qkv's clients compress.
- weighted D^2 sampling in rounds (k-means++: a pick a round; k-means||'s reduction: a few
  picks a round): one program per row makes all C picks, the row's weights, nearest distances
  and picked flags in registers; a round ranks the scores over its draws and takes its picks in
  turn (a max reduction each), then makes one pass over the row's points for each point's
  distance to the nearest of the round's picks. Rounds of several picks take it as
  ``|p|^2 + |c|^2 - 2 p.c``, the products of a few dims of every point with the round's picks a
  step on the tensor cores (16-bit points in their own dtype, exact; fp32 points as tf32, exact
  for bf16-valued ones; fp32 sums; |p|^2 once per row); a round of one pick reads the points
  transposed, [D, K], a few dims of every point a load, and sums the squared differences in the
  layout of the row's state (no reduction across threads, no barrier; a picked point is at 0
  from itself exactly). The picks are the reference's wherever the fp32 sums come out the same
  (exact for integer-valued points); otherwise a pick may differ where two keys are within
  rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.kmeans import ClusterSums, far_segments, round_sizes
from qkv.kernels.triton.bits import bf16_dot, round_to_bf16, split_bf16
from qkv.kernels.triton.tiles import AssignSumsTile, AssignTile, SeedTile, UpdateTile, multiprocessors, tile_for

# The sorted update sums RUN_TOKENS sorted tokens a program (RUN_STEP a product, RUN_CLUSTERS
# cluster ids a one-hot block): every program has the same work, whatever the cluster sizes
# (a warm start can make one cluster many times the average), and reads whole runs of tokens. The
# summation order depends on these (fixed) sizes.
RUN_TOKENS = 256
RUN_STEP = 128
RUN_CLUSTERS = 16
# The most clusters the one-hot update is used for: it reads the tokens once per block of
# clusters (UpdateTile.clusters, 64 by default); beyond two reads the sorted update is faster
ONEHOT_MAX_CLUSTERS = 128
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
# The far tokens: the most tokens a segment (one load of a program); the keys a program of the
# ranking ranks, against FAR_RANK_STEP of the row's keys a step on FAR_RANK_WARPS warps (compiled
# for sm_90 by Triton 3.6: 72 registers a thread, no spills; 128 keys a step spill)
FAR_MAX_SEGMENT = 16384
FAR_RANK_TILE = 128
FAR_RANK_STEP = 32
FAR_RANK_WARPS = 8
# The weighted D^2 sampling takes a round's distances as products on the tensor cores for rows of
# up to PRODUCTS_MAX_POINTS points (k-means||'s reduction up to 256 clusters): a step's operand
# tile, [points, dims] in shared memory, up to 16,384 values, pipelined in 3 stages where they
# take at most PRODUCTS_STAGED_BYTES (16-bit points: k-means||'s reduction took 0.436 ms at
# LongCat with 3, 0.494 with 2 on another H100: bench_kernels_seeding_products{_b2a28b3,}_h100.json),
# else 2 (fp32: 3 would not fit an A100's shared memory); the products [points, picks] in
# registers, up to 32,768 values
PRODUCTS_MAX_POINTS = 1024
PRODUCTS_MAX_VALUES = 32768
PRODUCTS_TILE = 16384
PRODUCTS_STAGED_BYTES = 98304


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


@triton.jit
def _assign_kernel(
    x_ptr, f_ptr, c_ptr, csq_ptr, idx_ptr, dist_ptr, S, CP, D: tl.constexpr, XN, XS,
    X_EXACT: tl.constexpr, HAS_SCALE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    d_ok = d < D
    x = tl.load(x_ptr + n * XN + s[:, None].to(tl.int64) * XS + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    best_i, best = _nearest(x.to(tl.float32), f, c_ptr, csq_ptr, n, CP, D, d, X_EXACT, EMULATE, BLOCK_C)
    tl.store(idx_ptr + n * S + s, best_i.to(tl.int64), mask=s_ok)
    tl.store(dist_ptr + n * S + s, best, mask=s_ok)


@triton.jit
def _assign_resident_kernel(
    x_ptr, f_ptr, c_ptr, csq_ptr, idx_ptr, dist_ptr, S, CP, D: tl.constexpr, XN, XS, TILES,
    X_EXACT: tl.constexpr, HAS_SCALE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """_assign_kernel for a row whose CP prepared centroids are one tile (CP == BLOCK_C, prepared
    without the tiled kernel's extra tile): the program loads them once and walks the row's token
    tiles p, p + P, ... (P programs a row), so the centroids are read once a program instead of
    once a token tile, and the token loads are pipelined across tiles."""
    n = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_C)
    cent = _centroid_tile(c_ptr + n * CP * D + j[None, :] * D + d[:, None], D, d)
    norm = tl.load(csq_ptr + n * CP + j)
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    for t in range(tl.program_id(1), TILES, tl.num_programs(1)):
        s = t * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < S
        x = tl.load(x_ptr + n * XN + s[:, None].to(tl.int64) * XS + d[None, :],
                    mask=s_ok[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        x_sq = tl.sum((x * f) * (x * f), axis=1)
        xh, xl = split_bf16(x, X_EXACT)
        dist = _distances(xh, xl, f, cent, norm, X_EXACT, EMULATE)
        best = tl.min(dist, axis=1)
        # ties keep the lowest centroid index, as in _nearest
        best_i = tl.min(tl.where(dist == best[:, None], j[None, :], CP), axis=1)
        tl.store(idx_ptr + n * S + s, best_i.to(tl.int64), mask=s_ok)
        tl.store(dist_ptr + n * S + s, tl.maximum(best + x_sq, 0.0), mask=s_ok)


@triton.jit
def first_at_least(keys, S, value, STEPS):
    """First position p in the sorted keys[0:S] with keys[p] >= value (S if none), for a scalar or
    a vector of values: a binary search of STEPS >= bit_length(S) halvings."""
    lo = value * 0
    hi = lo + S
    for _ in range(STEPS):
        go = lo < hi
        mid = (lo + hi) // 2
        k = tl.load(keys + mid, mask=go, other=0).to(tl.int32)
        right = go & (k < value)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(go & ~right, mid, hi)
    return lo


@triton.jit
def _bounds_kernel(key_ptr, bound_ptr, S, C, STEPS, BLOCK_C: tl.constexpr):
    """One row: where each cluster's run starts in the sorted keys (cluster ids plus n * C, see
    order_by_cluster), bound[n, j] for j = 0..C (bound[n, C] = S), by vectorized binary search."""
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_C)
    at = first_at_least(key_ptr + n * S, S, j + (n * C).to(tl.int32), STEPS)
    tl.store(bound_ptr + n * (C + 1) + j, at, mask=j <= C)


@triton.jit
def _onehot_sum(hot, x, acc, PARTS: tl.constexpr, EMULATE: tl.constexpr):
    """acc + hot @ x on the tensor cores (hot: 0/1 [M, T] fp32, x: [T, D] fp32) with every product
    exact: x goes in as PARTS bf16 parts that add up to it (1 for bf16 tokens, 2 for fp16, 3 for
    fp32), so only the fp32 sums round, in an order fixed by the tiles."""
    if EMULATE:  # the interpreter has no bf16 dot: the same exact products in fp32
        acc += tl.dot(hot, x, input_precision="ieee")
    else:
        hot = hot.to(tl.bfloat16)
        if PARTS == 1:
            acc = tl.dot(hot, x.to(tl.bfloat16), acc)
        else:
            high = round_to_bf16(x)
            acc = tl.dot(hot, high.to(tl.bfloat16), acc)
            rest = x - high
            if PARTS == 2:
                acc = tl.dot(hot, rest.to(tl.bfloat16), acc)
            else:
                mid = round_to_bf16(rest)
                acc = tl.dot(hot, mid.to(tl.bfloat16), acc)
                acc = tl.dot(hot, (rest - mid).to(tl.bfloat16), acc)
    return acc


@triton.jit
def _run_sum_kernel(
    x_ptr, f_ptr, key_ptr, order_ptr, bound_ptr, sum_ptr, edge_ptr, S, C, D, XN, XS, RUNS,
    PARTS: tl.constexpr, HAS_SCALE: tl.constexpr, EMULATE: tl.constexpr, RUN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Run r of row n's sorted tokens (positions r * RUN ..): each of its clusters' sum of the
    run's tokens (times the row's factor: HAS_SCALE), as one-hot products of BLOCK_J consecutive
    cluster ids at a time (see _onehot_sum). Only the run's first and last cluster can have tokens
    outside it: a cluster whole in the run goes to sums[n, c], the part of one that began before
    the run to edge[n, r, 0], of one that begins in it and goes on to edge[n, r, 1]. Keys and
    order as order_by_cluster makes them (ids plus n * C; positions in the flattened rows)."""
    n = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    lo = r * RUN
    hi = tl.minimum(lo + RUN, S)
    base = (n * C).to(tl.int32)
    first = tl.load(key_ptr + n * S + lo).to(tl.int32) - base
    last = tl.load(key_ptr + n * S + hi - 1).to(tl.int32) - base
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    for j0 in range(first, last + 1, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        acc = tl.zeros((BLOCK_J, BLOCK_D), tl.float32)
        for t0 in range(lo, hi, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < hi
            key = tl.where(t_ok, tl.load(key_ptr + n * S + t, mask=t_ok, other=0).to(tl.int32) - base, -1)
            tok = tl.load(order_ptr + n * S + t, mask=t_ok, other=0) - n * S
            x = tl.load(x_ptr + n * XN + tok[:, None].to(tl.int64) * XS + d[None, :],
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc = _onehot_sum((key[None, :] == j[:, None]).to(tl.float32), x * f, acc, PARTS, EMULATE)
        j_ok = j <= last
        start = tl.load(bound_ptr + n * (C + 1) + j, mask=j_ok, other=0)
        end = tl.load(bound_ptr + n * (C + 1) + j + 1, mask=j_ok, other=0)
        whole = j_ok & (end > start) & (start >= lo) & (end <= hi)
        tl.store(sum_ptr + (n * C + j)[:, None] * D + d[None, :], acc, mask=whole[:, None] & d_ok[None, :])
        before = (j == first) & (start < lo)
        after = (j == last) & (start >= lo) & (end > hi)
        edge = (n * RUNS + r) * 2 + after.to(tl.int64)
        tl.store(edge_ptr + edge[:, None] * D + d[None, :], acc, mask=(before | after)[:, None] & d_ok[None, :])


@triton.jit
def _reseeded(x_ptr, f_ptr, reseed_ptr, n, c, size, j, XN, XS, C, K, d, d_ok, HAS_SCALE: tl.constexpr):
    """Empty cluster ``c``'s new centroid: the j-th empty cluster of row n (``size``: the sizes of
    clusters ``j``) takes the token reseed[n, min(j, K - 1)] (times the row's factor: HAS_SCALE)."""
    rank = tl.minimum(tl.sum(((size == 0) & (j < c)).to(tl.int32), axis=0), K - 1)
    tok = tl.load(reseed_ptr + n * K + rank)
    out = tl.load(x_ptr + n * XN + tok.to(tl.int64) * XS + d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        out = out * tl.load(f_ptr + n)
    return out


@triton.jit
def _run_means_kernel(
    x_ptr, f_ptr, sum_ptr, edge_ptr, bound_ptr, reseed_ptr, old_ptr, new_ptr, count_ptr, XN, XS, C, D, K, RUNS,
    HAS_RESEED: tl.constexpr, HAS_SCALE: tl.constexpr, RUN: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One cluster: its sum (whole in one run, or its parts in the runs it spans, in order) over
    its size, or - empty - the re-seed token (the j-th empty cluster of the row takes
    reseed[n, min(j, K - 1)]) or the old centroid."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    row = bound_ptr + n * (C + 1)
    start = tl.load(row + c)
    end = tl.load(row + c + 1)
    count = end - start
    if count > 0:
        first = start // RUN
        last = (end - 1) // RUN
        if first == last:
            total = tl.load(sum_ptr + (n * C + c) * D + d, mask=d_ok, other=0.0)
        else:
            total = tl.load(edge_ptr + ((n * RUNS + first) * 2 + 1) * D + d, mask=d_ok, other=0.0)
            for r in range(first + 1, last + 1):
                total += tl.load(edge_ptr + (n * RUNS + r) * 2 * D + d, mask=d_ok, other=0.0)
        out = tl.math.div_rn(total, count.to(tl.float32))
    elif HAS_RESEED:
        j = tl.arange(0, BLOCK_C)
        size = tl.load(row + j + 1, mask=j < C, other=1) - tl.load(row + j, mask=j < C, other=0)
        out = _reseeded(x_ptr, f_ptr, reseed_ptr, n, c, size, j, XN, XS, C, K, d, d_ok, HAS_SCALE)
    else:
        out = tl.load(old_ptr + (n * C + c) * D + d, mask=d_ok, other=0.0)
    tl.store(new_ptr + (n * C + c) * D + d, out, mask=d_ok)
    tl.store(count_ptr + n * C + c, count.to(tl.float32))


def unit_d(x: torch.Tensor) -> torch.Tensor:
    """``x`` [N, S, D] as the kernels read it, with any strides along N and S (a slice of a longer
    buffer, keys and values stacked as one view: nothing copied) and unit stride along D (a copy
    otherwise)."""
    return x if x.stride(2) == 1 else x.contiguous()


def assign_supports(x, centroids, scale=None, sums=False) -> str | None:
    if x.shape[-1] > 256:
        return f"D={x.shape[-1]} is larger than 256"
    return None


def assign_triton(
    x: torch.Tensor, centroids: torch.Tensor, scale: torch.Tensor | None = None, sums: bool = False, *,
    tile: AssignTile | None = None, sum_tile: AssignSumsTile | None = None,
) -> tuple:
    """Triton twin of :func:`qkv.kernels.kmeans.assign_torch`: nearest of the centroids rounded
    to bf16 (see the module docstring); ``scale`` multiplies each token as it is loaded. With
    ``sums``, up to FUSED_MAX_CLUSTERS clusters of at most 128 dims, the clusters' sums come from
    the same pass (``_cluster_sum_kernel`` with ASSIGN); beyond, the third element is None.
    ``tile``: the launch of the plain assignment, ``sum_tile`` of the one that sums (default: the
    device's, see :mod:`qkv.kernels.triton.tiles`)."""
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
    idx = torch.empty(n, s, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, s, dtype=torch.float32, device=x.device)
    f = x if scale is None else scale.float().contiguous()
    common = dict(X_EXACT=x.dtype == torch.bfloat16, HAS_SCALE=scale is not None, EMULATE=x.device.type != "cuda")
    if fused:
        splits, per_split = _splits(x, n, s, sum_tile)
        part = _empty_sums(x, splits, c)
        _cluster_sum_kernel[(n, 1, splits)](
            x, f, idx, neg2, c_sq, dist, part.sums, part.counts, s, c, d, x.stride(0), x.stride(1), per_split,
            ASSIGN=True, PARTS=_parts(x), BLOCK_T=sum_tile.tokens, BLOCK_C=block_c, BLOCK_D=block_d,
            num_warps=sum_tile.warps, **common,
        )
        return idx, dist, part
    block_s = tile.tokens if block_d <= 128 else tile.tokens // 2
    tiles = triton.cdiv(s, block_s)
    launch = dict(BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=tile.warps, num_stages=tile.stages,
                  **common)
    if resident:
        # whole rounds of programs: one more a row past the GPU's slots would run as a second round
        _assign_resident_kernel[(n, max(1, min(tiles, _slots(x, tile.waves) // n)))](
            x, f, neg2, c_sq, idx, dist, s, cp, d, x.stride(0), x.stride(1), tiles, **launch)
    else:
        _assign_kernel[(n, tiles)](x, f, neg2, c_sq, idx, dist, s, cp, d, x.stride(0), x.stride(1), **launch)
    return (idx, dist, None) if sums else (idx, dist)


def update_triton(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    reseed: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    sums: ClusterSums | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`qkv.kernels.kmeans.update_torch` (deterministic): the means of the
    assignment pass's ``sums`` where it gathered them; otherwise the one-hot sums up to
    ONEHOT_MAX_CLUSTERS clusters, the sorted sums beyond (on an H200, 1.9x faster at 64
    clusters, 1.07x at 128, 1.2-1.8x slower at 256 with balanced clusters:
    bench_kmeans_update_h200.json)."""
    if sums is not None:
        return _means(x, sums, centroids, reseed, scale)
    update = update_onehot if centroids.shape[1] <= ONEHOT_MAX_CLUSTERS else update_sorted
    return update(x, assignments, centroids, reseed, scale)


def order_by_cluster(assignments: torch.Tensor, clusters: int):
    """Each row's tokens ordered by cluster (a stable sort): keys [N, S], row n's cluster ids
    ascending, each plus n * C; order [N, S] int64, the tokens in that order as positions in the
    flattened rows (n * S + token); and each cluster's first position in its row [N, C + 1] int32
    (the last column S; found by binary search). Where N * C fits int16 the keys are int16 and
    every row is sorted at once as one flat array: two radix passes, where torch's sort of rows
    adds a pass pairing each element with its row and one unpacking them
    (benchmarks/sort_variants.py); otherwise int32 keys, sorted a row at a time."""
    n, s = assignments.shape
    flat = n * clusters <= 1 << 15
    kind = torch.int16 if flat else torch.int32
    keys = assignments.to(kind)
    keys += (torch.arange(n, dtype=kind, device=keys.device) * clusters).view(-1, 1)
    if flat:
        keys, order = torch.sort(keys.flatten(), stable=True)
        keys, order = keys.view(n, s), order.view(n, s)
    else:
        keys, order = torch.sort(keys, dim=1, stable=True)
        order += torch.arange(0, n * s, s, device=order.device).view(-1, 1)
    bounds = torch.empty(n, clusters + 1, dtype=torch.int32, device=assignments.device)
    _bounds_kernel[(n,)](keys, bounds, s, clusters, s.bit_length(), BLOCK_C=triton.next_power_of_2(clusters + 1),
                         num_warps=4)
    return keys, order, bounds


def update_sorted(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    reseed: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update with the tokens ordered by cluster (a stable sort) and summed in runs of
    RUN_TOKENS sorted tokens, a program each (the same work whatever the cluster sizes): one-hot
    products over the few clusters a run holds, then one program per cluster adds its runs' parts
    in order."""
    x = unit_d(x)
    f = x if scale is None else scale.float().contiguous()
    n, s, d = x.shape
    c = centroids.shape[1]
    keys, order, bounds = order_by_cluster(assignments, c)
    block_d = max(16, triton.next_power_of_2(d))
    runs = triton.cdiv(s, RUN_TOKENS)
    sums = torch.empty(n, c, d, dtype=torch.float32, device=x.device)
    edges = torch.empty(n, runs, 2, d, dtype=torch.float32, device=x.device)
    _run_sum_kernel[(n, runs)](
        x, f, keys, order, bounds, sums, edges, s, c, d, x.stride(0), x.stride(1), runs,
        PARTS=_parts(x), HAS_SCALE=scale is not None,
        EMULATE=not x.is_cuda, RUN=RUN_TOKENS, BLOCK_T=RUN_STEP, BLOCK_J=RUN_CLUSTERS, BLOCK_D=block_d, num_warps=4,
        num_stages=1,  # pipelined: 0.99-1.75x the time at every launch (results/sweep_run_sum_h100.json)
    )
    new = torch.empty(n, c, d, dtype=torch.float32, device=x.device)
    counts = torch.empty(n, c, dtype=torch.float32, device=x.device)
    old = centroids.float().contiguous()
    _run_means_kernel[(n, c)](
        x, f, sums, edges, bounds, old if reseed is None else reseed.contiguous(), old, new, counts,
        x.stride(0), x.stride(1), c, d, 1 if reseed is None else reseed.shape[1], runs,
        HAS_RESEED=reseed is not None, HAS_SCALE=scale is not None, RUN=RUN_TOKENS, BLOCK_D=block_d,
        BLOCK_C=triton.next_power_of_2(c), num_warps=4,
    )
    return new, counts


@triton.jit
def _cluster_sum_kernel(
    x_ptr, f_ptr, a_ptr, c_ptr, csq_ptr, dist_ptr, sum_ptr, cnt_ptr, S, C, D: tl.constexpr, XN, XS, per_split,
    ASSIGN: tl.constexpr, X_EXACT: tl.constexpr, PARTS: tl.constexpr, HAS_SCALE: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tokens p * per_split .. of row n, the clusters of block program_id(1): each cluster's sum of its tokens
    (times the row's factor: HAS_SCALE) and their count, into sums[n, p, c] and counts[n, p, c],
    as one-hot products on the tensor cores (see _onehot_sum). The tokens' clusters are read from
    a [N, S], or with ASSIGN (one block of every cluster) worked out from the prepared centroids
    c and their norms csq, BLOCK_C a row (see _nearest), and written to a (int64), their distances
    to dist."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    cnt = tl.zeros((BLOCK_C,), tl.float32)
    lo = p * per_split
    hi = tl.minimum(lo + per_split, S)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < hi
        x = tl.load(x_ptr + n * XN + t[:, None].to(tl.int64) * XS + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        if ASSIGN:
            a, best = _nearest(x, f, c_ptr, csq_ptr, n, BLOCK_C, D, d, X_EXACT, EMULATE, BLOCK_C)
            tl.store(a_ptr + n * S + t, a.to(tl.int64), mask=t_ok)
            tl.store(dist_ptr + n * S + t, best, mask=t_ok)
            a = tl.where(t_ok, a, -1)
        else:
            a = tl.load(a_ptr + n * S + t, mask=t_ok, other=-1)
        hot = (a[None, :] == c[:, None]).to(tl.float32)  # [BLOCK_C, BLOCK_T]
        cnt += tl.sum(hot, axis=1)
        acc = _onehot_sum(hot, x * f, acc, PARTS, EMULATE)
    row = (n * tl.num_programs(2) + p) * C + c
    c_ok = c < C
    tl.store(sum_ptr + row[:, None] * D + d[None, :], acc, mask=c_ok[:, None] & d_ok[None, :])
    tl.store(cnt_ptr + row, cnt, mask=c_ok)


@triton.jit
def _means_kernel(
    x_ptr, f_ptr, sum_ptr, cnt_ptr, reseed_ptr, old_ptr, new_ptr, count_ptr, XN, XS, C, D, K,
    SPLITS: tl.constexpr, HAS_RESEED: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One cluster: the sum of its splits' sums over its size, or - empty - the re-seed token
    (the j-th empty cluster of the row takes reseed[n, min(j, K - 1)]) or the old centroid."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    split = (n * SPLITS + tl.arange(0, SPLITS)) * C
    sums = tl.load(sum_ptr + (split[:, None] + c) * D + d[None, :], mask=d_ok[None, :], other=0.0)
    count = tl.sum(tl.load(cnt_ptr + split + c), axis=0)
    mean = tl.math.div_rn(tl.sum(sums, axis=0), tl.maximum(count, 1.0))
    if count > 0:
        out = mean
    elif HAS_RESEED:
        j = tl.arange(0, BLOCK_C)
        size = tl.sum(tl.load(cnt_ptr + split[:, None] + j[None, :], mask=(j < C)[None, :], other=1.0), axis=0)
        out = _reseeded(x_ptr, f_ptr, reseed_ptr, n, c, size, j, XN, XS, C, K, d, d_ok, HAS_SCALE)
    else:
        out = tl.load(old_ptr + (n * C + c) * D + d, mask=d_ok, other=0.0)
    tl.store(new_ptr + (n * C + c) * D + d, out, mask=d_ok)
    tl.store(count_ptr + n * C + c, count)


def _parts(x: torch.Tensor) -> int:
    """The bf16 parts a token of ``x``'s dtype is summed in (see _onehot_sum)."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 3)


def _empty_sums(x: torch.Tensor, splits: int, clusters: int) -> ClusterSums:
    """Uninitialized :class:`ClusterSums` of ``splits`` parts for the rows of ``x`` [N, S, D]."""
    n, _, d = x.shape
    return ClusterSums(torch.empty(n, splits, clusters, d, dtype=torch.float32, device=x.device),
                       torch.empty(n, splits, clusters, dtype=torch.float32, device=x.device))


def _slots(x: torch.Tensor, waves: int) -> int:
    """Programs for ``waves`` a multiprocessor of ``x``'s GPU (``waves`` off a GPU)."""
    return waves * (multiprocessors(x.device.index or 0) if x.is_cuda else 1)


def _splits(x: torch.Tensor, unsplit: int, s: int, tile: UpdateTile | AssignSumsTile) -> tuple[int, int]:
    """Parts of a row's ``s`` tokens for the one-hot sums of a launch of ``unsplit`` programs
    without parts (the tokens are cut in two until the GPU holds ``tile.waves`` programs per
    multiprocessor, or a part would hold fewer than two steps), and the tokens of a part (whole
    steps)."""
    programs = _slots(x, tile.waves)
    splits = 1
    while unsplit * splits < programs and s > 2 * splits * tile.tokens:
        splits *= 2
    return splits, triton.cdiv(triton.cdiv(s, splits), tile.tokens) * tile.tokens


def _means(x, sums: ClusterSums, centroids, reseed, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """The means of ``sums`` (parts added in order), re-seeds for the empty clusters."""
    x = unit_d(x)
    n, splits, c, d = sums.sums.shape
    f = x if scale is None else scale.float().contiguous()
    new = torch.empty(n, c, d, dtype=torch.float32, device=x.device)
    counts = torch.empty(n, c, dtype=torch.float32, device=x.device)
    old = centroids.float().contiguous()
    _means_kernel[(n, c)](
        x, f, sums.sums, sums.counts, old if reseed is None else reseed.contiguous(), old, new, counts, x.stride(0),
        x.stride(1), c, d, 1 if reseed is None else reseed.shape[1], SPLITS=splits, HAS_RESEED=reseed is not None,
        HAS_SCALE=scale is not None, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_C=triton.next_power_of_2(c),
        num_warps=4,
    )
    return new, counts


def update_onehot(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    reseed: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    tile: UpdateTile | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The update without the sort: per-cluster sums as one-hot products on the tensor cores, the
    tokens cut into splits when the rows and cluster blocks alone would not fill the GPU
    (``tile.waves`` programs per multiprocessor), then one program per cluster adds its splits in
    order. Its cost does not depend on the cluster sizes, but grows with their number. ``tile``:
    the launch (default: the device's, see :mod:`qkv.kernels.triton.tiles`)."""
    x, assignments = unit_d(x), assignments.contiguous()
    f = x if scale is None else scale.float().contiguous()
    n, s, d = x.shape
    c = centroids.shape[1]
    tile = tile or tile_for("update", x.device, 0)
    block_d = max(16, triton.next_power_of_2(d))
    block_c = min(tile.clusters, max(16, triton.next_power_of_2(c)))
    c_blocks = triton.cdiv(c, block_c)
    splits, per_split = _splits(x, n * c_blocks, s, tile)
    part = _empty_sums(x, splits, c)
    _cluster_sum_kernel[(n, c_blocks, splits)](
        x, f, assignments, x, x, x, part.sums, part.counts, s, c, d, x.stride(0), x.stride(1), per_split,
        ASSIGN=False, X_EXACT=False, PARTS=_parts(x), HAS_SCALE=scale is not None, EMULATE=not x.is_cuda,
        BLOCK_T=tile.tokens, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=tile.warps,
    )
    return _means(x, part, centroids, reseed, scale)


@triton.jit
def _round_distances(p_ptr, pt_ptr, n, K, D, k, k_ok, new, size, BLOCK_K: tl.constexpr, ROUND_P: tl.constexpr,
                     DIMS: tl.constexpr):
    """Each of row n's points' squared distance to the nearest of a round's ``size`` picks ``new``
    (at most ROUND_P), [BLOCK_K] in the layout of the row's state: the points transposed pt
    [N, D, K], DIMS dims of every point a load, each pick's sum of squared differences over the
    dims kept on its own (so a picked point is at 0 from itself, exactly)."""
    i = tl.arange(0, ROUND_P)
    picks = ()
    sums = ()
    for t in tl.static_range(ROUND_P):
        picks = picks + (tl.sum(tl.where(i == t, new, 0), axis=0),)
        sums = sums + (tl.zeros((BLOCK_K,), tl.float32),)
    for d0 in range(0, D, DIMS):
        dims = d0 + tl.arange(0, DIMS)
        dims_ok = dims < D
        pts = tl.load(pt_ptr + n * D * K + dims[:, None] * K + k[None, :], mask=dims_ok[:, None] & k_ok[None, :],
                      other=0.0).to(tl.float32)
        more = ()
        for t in tl.static_range(ROUND_P):
            c = tl.load(p_ptr + (n * K + picks[t]) * D + dims, mask=dims_ok, other=0.0).to(tl.float32)  # t >= size: 0
            diff = pts - c[:, None]
            more = more + (sums[t] + tl.sum(diff * diff, 0),)
        sums = more
    closest = sums[0]
    for t in tl.static_range(1, ROUND_P):
        closest = tl.where(t < size, tl.minimum(closest, sums[t]), closest)
    return closest


@triton.jit
def _squared_norms(p_ptr, n, K, D, k, k_ok, BLOCK_K: tl.constexpr, DIMS: tl.constexpr):
    """|p|^2 of each of row n's points p [N, K, D], [BLOCK_K]."""
    norms = tl.zeros((BLOCK_K,), tl.float32)
    row = p_ptr + n * K * D
    for d0 in range(0, D, DIMS):
        dims = d0 + tl.arange(0, DIMS)
        pts = tl.load(row + k[:, None] * D + dims[None, :], mask=k_ok[:, None] & (dims < D)[None, :], other=0.0)
        pts = pts.to(tl.float32)
        norms += tl.sum(pts * pts, 1)
    return norms


@triton.jit
def _round_products(p_ptr, n, K, D, k, k_ok, new, size, norms, BLOCK_K: tl.constexpr, ROUND_P: tl.constexpr,
                    DIMS: tl.constexpr, EMULATE: tl.constexpr):
    """As :func:`_round_distances`, as ``|p|^2 + |c|^2 - 2 p.c`` (at least 0): the products of
    DIMS dims of every point [BLOCK_K, DIMS] with the round's picks [DIMS, ROUND_P] a step on
    the tensor cores (16-bit points in their own dtype, exact; fp32 points as tf32, exact for
    bf16-valued ones; fp32 sums), ``norms`` the points' |p|^2. EMULATE: Triton's interpreter,
    which has no 16-bit product, takes the same exact products in fp32."""
    i = tl.arange(0, ROUND_P)
    products = tl.zeros((BLOCK_K, ROUND_P), tl.float32)
    picked_norms = tl.zeros((ROUND_P,), tl.float32)
    row = p_ptr + n * K * D
    for d0 in range(0, D, DIMS):
        dims = d0 + tl.arange(0, DIMS)
        dims_ok = dims < D
        pts = tl.load(row + k[:, None] * D + dims[None, :], mask=k_ok[:, None] & dims_ok[None, :], other=0.0)
        c = tl.load(row + new[None, :] * D + dims[:, None], mask=dims_ok[:, None], other=0.0)
        if pts.dtype == tl.float32:
            products = tl.dot(pts, c, products, input_precision="tf32")
        elif EMULATE:
            products = tl.dot(pts.to(tl.float32), c.to(tl.float32), products, input_precision="ieee")
        else:
            products = tl.dot(pts, c, products)
        c = c.to(tl.float32)
        picked_norms += tl.sum(c * c, 0)
    part = tl.where((i < size)[None, :], picked_norms[None, :] - 2.0 * products, float("inf"))
    return tl.maximum(norms + tl.min(part, 1), 0.0)


@triton.jit
def _kmeanspp_kernel(p_ptr, pt_ptr, w_ptr, e_ptr, out_ptr, near_ptr, K, C, R, D, BLOCK_K: tl.constexpr,
                     ROUND_P: tl.constexpr, DIMS: tl.constexpr, PRODUCTS: tl.constexpr, EMULATE: tl.constexpr):
    """The C picks of row n in R rounds (see kmeanspp_torch): points p [N, K, D] (fp32 or 16-bit)
    and transposed pt [N, D, K], weights [N, K], draws e [R, K], picks out [N, C]. A round ranks
    the row's points by its keys and takes its picks in turn (the row's weights, nearest distances
    and picked flags stay in registers), then makes one pass over the points, DIMS dims of every point a load, for
    each point's distance to the nearest of the round's picks (at most ROUND_P), straight into
    the row's nearest distances: as products on the tensor cores (PRODUCTS; the distances pass
    through near [N, BLOCK_K] on their way to the layout of the row's state, which would otherwise
    take the products' layout, four threads a point) or as sums of squared differences."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    k_ok = k < K
    i = tl.arange(0, ROUND_P)
    w = tl.load(w_ptr + n * K + k, mask=k_ok, other=0.0)
    nearest = tl.full((BLOCK_K,), 1.0, tl.float32)  # round 0 draws by weight alone
    taken = k >= K  # the padding is never picked
    if PRODUCTS:
        norms = _squared_norms(p_ptr, n, K, D, k, k_ok, BLOCK_K, DIMS)
    rest = tl.maximum(R - 1, 1)
    base = (C - 1) // rest
    extra = (C - 1) % rest
    at = 0
    for r in range(R):
        size = tl.where(r == 0, 1, base + (r - 1 >= rest - extra).to(tl.int32))
        score = tl.where(taken, 0.0, w * nearest)
        e = tl.load(e_ptr + r * K + k, mask=k_ok, other=1.0)
        # one reduction a pick: positive scores by score / draw, then the points left by index (keys
        # -1 - k / BLOCK_K in (-2, -1], exact), never a picked one (-3)
        key = tl.where(score > 0.0, tl.math.div_rn(score, e),
                       tl.where(taken, -3.0, -1.0 - k.to(tl.float32) * (1.0 / BLOCK_K)))
        new = tl.zeros((ROUND_P,), tl.int32)
        for j in range(size):
            best = tl.argmax(key, 0)
            tl.store(out_ptr + n * C + at + j, best.to(tl.int64))
            taken = taken | (k == best)
            key = tl.where(k == best, -3.0, key)
            new = tl.where(i == j, best, new)
        at += size
        if at < C:  # distances to the round's picks, for the rounds after it
            if PRODUCTS:
                closest = _round_products(p_ptr, n, K, D, k, k_ok, new, size, norms, BLOCK_K, ROUND_P, DIMS, EMULATE)
                tl.store(near_ptr + n * BLOCK_K + k, closest)
                tl.debug_barrier()  # every thread's distances stored before any is read back
                closest = tl.load(near_ptr + n * BLOCK_K + k)
                tl.debug_barrier()  # and read before the next round stores its own
            else:
                closest = _round_distances(p_ptr, pt_ptr, n, K, D, k, k_ok, new, size, BLOCK_K, ROUND_P, DIMS)
            nearest = tl.where(r == 0, closest, tl.minimum(nearest, closest))


@triton.jit
def _segment_peak_kernel(d_ptr, key_ptr, S, size, segments, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr):
    """The peaks of BLOCK_G segments of ``size`` tokens of row program_id(0) of dist [N, S] (>= 0),
    a key a segment that sorts as far_tokens_torch ranks them: the peak's bits (-0 as 0) above the
    peak token's distance from 2**31 - 1 (equal peaks: the lowest token first; within a segment
    the first of equal distances)."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    t = tl.arange(0, BLOCK_T)
    ok = (g < segments)[:, None] & (t < size)[None, :]
    v = tl.load(d_ptr + n * S + g[:, None] * size + t[None, :], mask=ok, other=float("-inf"))
    peak, at = tl.max(v, axis=1, return_indices=True, return_indices_tie_break_left=True)
    bits = tl.where(peak == 0.0, 0, peak.to(tl.int32, bitcast=True))
    key = (bits.to(tl.int64) << 32) | (2147483647 - (g * size + at)).to(tl.int64)
    tl.store(key_ptr + n * segments + g, key, mask=g < segments)


@triton.jit
def _rank_segments_kernel(key_ptr, out_ptr, segments, k, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """BLOCK_R segment keys of row program_id(0): each one's rank among the row's keys (how many
    are larger: the keys are distinct), and the tokens of those ranked below k to out[n, rank]
    (a rank by counting, many programs a row, instead of one program's sort)."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mine = tl.load(key_ptr + n * segments + g, mask=g < segments, other=-1)
    larger = tl.zeros((BLOCK_R, BLOCK_H), tl.int32)
    h = tl.arange(0, BLOCK_H)
    for h0 in range(0, segments, BLOCK_H):
        other = tl.load(key_ptr + n * segments + h0 + h, mask=h0 + h < segments, other=-1)
        larger += (other[None, :] > mine[:, None]).to(tl.int32)
    rank = tl.sum(larger, axis=1)
    tl.store(out_ptr + n * k + rank, 2147483647 - (mine & 4294967295), mask=(g < segments) & (rank < k))


def far_tokens_supports(dist, k, per_pick) -> str | None:
    size, _ = far_segments(dist.shape[1], k, per_pick)
    if triton.next_power_of_2(size) > FAR_MAX_SEGMENT:
        return f"segments of {size} tokens are longer than a load ({FAR_MAX_SEGMENT})"
    return None


def far_tokens_triton(dist: torch.Tensor, k: int, per_pick: int) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.kmeans.far_tokens_torch`: the segments' peaks as sortable
    int64 keys (one pass over ``dist``, many programs a row), then each key's rank among its row's
    by counting the larger ones (many programs a row; a one-program bitonic top-k of a LongCat
    row's 1,058 keys took 0.030 ms on an H100): two launches, no sort."""
    dist = dist.contiguous()
    n, s = dist.shape
    size, segments = far_segments(s, k, per_pick)
    keys = torch.empty(n, segments, dtype=torch.int64, device=dist.device)
    block_t = triton.next_power_of_2(size)
    block_g = max(1, min(triton.next_power_of_2(segments), 4096 // block_t))
    _segment_peak_kernel[(n, triton.cdiv(segments, block_g))](dist, keys, s, size, segments, BLOCK_G=block_g,
                                                              BLOCK_T=block_t, num_warps=4)
    out = torch.empty(n, k, dtype=torch.int64, device=dist.device)
    _rank_segments_kernel[(n, triton.cdiv(segments, FAR_RANK_TILE))](keys, out, segments, k, BLOCK_R=FAR_RANK_TILE,
                                                                    BLOCK_H=FAR_RANK_STEP, num_warps=FAR_RANK_WARPS)
    return out


def kmeanspp_supports(points, weights, draws, clusters) -> str | None:
    if points.shape[1] > 16384:
        return f"{points.shape[1]} points a row is more than the kernel holds in registers (16384)"
    return None


def kmeanspp_launch(points: int, dims: int, per_round: int, tile: SeedTile, itemsize: int) -> dict:
    """The kernel's constexprs, warps and stages for rows of ``points`` points of ``dims`` dims
    (``itemsize`` bytes each), rounds of at most ``per_round`` picks: distance passes over at most
    ``tile.values`` values a load (a few dims of every point), as products on the tensor cores for
    rounds of several picks on rows that fit (see PRODUCTS_MAX_POINTS; 16 dims a step at least,
    the product's smallest depth), as sums of squared differences otherwise."""
    block_k = triton.next_power_of_2(points)
    round_p = triton.next_power_of_2(per_round)
    products = per_round > 1 and block_k <= PRODUCTS_MAX_POINTS and round_p * block_k <= PRODUCTS_MAX_VALUES
    values = min(tile.values, PRODUCTS_TILE) if products else tile.values
    step = max(16 if products else 1, min(triton.next_power_of_2(dims), values // block_k))
    stages = 3 if products and 3 * block_k * step * itemsize <= PRODUCTS_STAGED_BYTES else 2
    return dict(BLOCK_K=block_k, ROUND_P=round_p, PRODUCTS=products, DIMS=step,
                num_warps=min(16, max(tile.warps, block_k // 256)), num_stages=stages)


def kmeanspp_triton(points: torch.Tensor, weights: torch.Tensor, draws: torch.Tensor, clusters: int, *,
                    tile: SeedTile | None = None) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.kmeans.kmeanspp_torch` (see the module docstring).
    ``tile``: the launch (default: the device's, see :mod:`qkv.kernels.triton.tiles`)."""
    points = (points if points.dtype in (torch.float16, torch.bfloat16) else points.float()).contiguous()
    n, k, d = points.shape
    rounds = draws.shape[0]
    launch = kmeanspp_launch(k, d, max(round_sizes(clusters, rounds)), tile or tile_for("kmeanspp", points.device, 0),
                             points.element_size())
    out = torch.empty(n, clusters, dtype=torch.int64, device=points.device)
    if launch["PRODUCTS"]:  # the products read the points as they are; the distances pass through near
        transposed, near = points, torch.empty(n, launch["BLOCK_K"], device=points.device)
    else:
        transposed, near = points.transpose(1, 2).contiguous(), points
    _kmeanspp_kernel[(n,)](
        points, transposed, weights.float().contiguous(), draws.float().contiguous(), out, near, k, clusters, rounds, d,
        EMULATE=not points.is_cuda, **launch,
    )
    return out
