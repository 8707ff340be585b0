"""Each cluster's sum of its tokens as one-hot products on the tensor cores (the clusters read, or
found on the way by the assignment's building blocks), and the means of those sums; the update
up to ONEHOT_MAX_CLUSTERS clusters (:func:`update_onehot`: two passes over the tokens), and the
means of the sums an assignment pass gathered. Deterministic: no floating-point atomics, parts
added in order; empty clusters keep their centroid (far.py re-seeds them). Results differ
from the reference only by fp32 summation order, and are bit-identical from run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.kmeans import ClusterSums
from qkv.kernels.triton.bits import round_to_bf16
from qkv.kernels.triton.kmeans.nearest import _nearest, _peak_bits, _slots, unit_d
from qkv.kernels.triton.tiles import AssignSumsTile, UpdateTile, tile_for


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
def _cluster_sum_kernel(
    x_ptr, f_ptr, a_ptr, c_ptr, csq_ptr, dist_ptr, sum_ptr, cnt_ptr, top_ptr, S, C, D: tl.constexpr, XN, XS,
    per_split, ASSIGN: tl.constexpr, X_EXACT: tl.constexpr, PARTS: tl.constexpr, HAS_SCALE: tl.constexpr,
    EMULATE: tl.constexpr, PEAKS: tl.constexpr, REDO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Tokens p * per_split .. of row n, the clusters of block program_id(1): each cluster's sum of its tokens
    (times the row's factor: HAS_SCALE) and their count, into sums[n, p, c] and counts[n, p, c],
    as one-hot products on the tensor cores (see _onehot_sum). The tokens' clusters are read from
    a [N, S], or with ASSIGN (one block of every cluster) worked out from the prepared centroids
    c and their norms csq, BLOCK_C a row (see _nearest), and written to a (int64), their distances
    to dist. PEAKS: the max |x| of the part's tokens (as bits, see _peak_bits) into top[n, p];
    REDO: only rows whose factor is not 1 (the others' outputs are left as they are)."""
    n = tl.program_id(0).to(tl.int64)
    f = 1.0
    if HAS_SCALE:
        f = tl.load(f_ptr + n)
    if REDO:
        if f != 1.0:
            _cluster_sums(x_ptr, f, a_ptr, c_ptr, csq_ptr, dist_ptr, sum_ptr, cnt_ptr, top_ptr, n, S, C, D, XN, XS,
                          per_split, ASSIGN, X_EXACT, PARTS, EMULATE, PEAKS, BLOCK_T, BLOCK_C, BLOCK_D)
    else:
        _cluster_sums(x_ptr, f, a_ptr, c_ptr, csq_ptr, dist_ptr, sum_ptr, cnt_ptr, top_ptr, n, S, C, D, XN, XS,
                      per_split, ASSIGN, X_EXACT, PARTS, EMULATE, PEAKS, BLOCK_T, BLOCK_C, BLOCK_D)


@triton.jit
def _cluster_sums(x_ptr, f, a_ptr, c_ptr, csq_ptr, dist_ptr, sum_ptr, cnt_ptr, top_ptr, n, S, C, D: tl.constexpr, XN,
                  XS, per_split, ASSIGN: tl.constexpr, X_EXACT: tl.constexpr, PARTS: tl.constexpr,
                  EMULATE: tl.constexpr, PEAKS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.program_id(2)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
    cnt = tl.zeros((BLOCK_C,), tl.float32)
    top = tl.zeros((BLOCK_T,), tl.int32)
    lo = p * per_split
    hi = tl.minimum(lo + per_split, S)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < hi
        x = tl.load(x_ptr + n * XN + t[:, None].to(tl.int64) * XS + d[None, :], mask=t_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if PEAKS:
            top = _peak_bits(x, top)
        x = x.to(tl.float32)
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
    if PEAKS:
        tl.store(top_ptr + n * tl.num_programs(2) + p, tl.max(top, axis=0))


@triton.jit
def _means_kernel(sum_ptr, cnt_ptr, old_ptr, new_ptr, count_ptr, C, D, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One cluster: the sum of its splits' sums over its size, or - empty - the old centroid."""
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


def _means(sums: ClusterSums, centroids) -> tuple[torch.Tensor, torch.Tensor]:
    """The means of ``sums`` (parts added in order); empty clusters keep ``centroids``."""
    n, splits, c, d = sums.sums.shape
    new = torch.empty(n, c, d, dtype=torch.float32, device=centroids.device)
    counts = torch.empty(n, c, dtype=torch.float32, device=centroids.device)
    _means_kernel[(n, c)](sums.sums, sums.counts, centroids.float().contiguous(), new, counts, c, d, SPLITS=splits,
                          BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4)
    return new, counts


def update_onehot(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
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
        x, f, assignments, x, x, x, part.sums, part.counts, x, s, c, d, x.stride(0), x.stride(1), per_split,
        ASSIGN=False, X_EXACT=False, PARTS=_parts(x), HAS_SCALE=scale is not None, EMULATE=not x.is_cuda, PEAKS=False,
        REDO=False,
        BLOCK_T=tile.tokens, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=tile.warps,
    )
    return _means(part, centroids)
