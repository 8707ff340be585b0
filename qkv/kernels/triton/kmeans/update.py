"""The k-means update, Triton twin of :func:`qkv.kernels.kmeans.update_torch`: deterministic, no
floating-point atomics, two ways to the same sums. Up to ONEHOT_MAX_CLUSTERS clusters,
:func:`~.sums.update_onehot` sums each cluster's tokens as one-hot products. With more,
:func:`update_sorted` orders the tokens by cluster (a stable sort of every row at once where row
and cluster fit int16) and sums runs of RUN_TOKENS sorted tokens a program, as one-hot products
over the few clusters a run holds; a cluster spanning several runs adds its parts in order.
benchmarks/results/bench_kmeans_update_h200.json has both at the shapes qkv's clients compress.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.kmeans import ClusterSums
from qkv.kernels.triton.kmeans.nearest import unit_d
from qkv.kernels.triton.kmeans.sums import _means, _onehot_sum, _parts, update_onehot


# The sorted update sums RUN_TOKENS sorted tokens a program (RUN_STEP a product, RUN_CLUSTERS
# cluster ids a one-hot block): every program has the same work, whatever the cluster sizes
# (a warm start can make one cluster many times the average), and reads whole runs of tokens. The
# summation order depends on these (fixed) sizes.
RUN_TOKENS = 256
RUN_STEP = 128
RUN_CLUSTERS = 16
# Tokens a program of the sort keys' pass converts
SORT_KEYS_BLOCK = 2048
# The most clusters the one-hot update is used for: it reads the tokens once per block of
# clusters (UpdateTile.clusters, 64 by default); beyond two reads the sorted update is faster
ONEHOT_MAX_CLUSTERS = 128


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
def _sort_keys_kernel(a_ptr, key_ptr, S, A_SN, C, BLOCK: tl.constexpr):
    """Tokens s of row program_id(0) of assignments [N, S] (any integer dtype, row stride A_SN):
    their sort keys a + n * C in the keys' dtype (int16 or int32), one pass."""
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + n * A_SN + s, mask=s < S, other=0)
    tl.store(key_ptr + n * S + s, (a + n * C).to(key_ptr.dtype.element_ty), mask=s < S)


@triton.jit
def _bounds_kernel(key_ptr, bound_ptr, S, C, STEPS, BLOCK_C: tl.constexpr):
    """One row: where each cluster's run starts in the sorted keys (cluster ids plus n * C, see
    order_by_cluster), bound[n, j] for j = 0..C (bound[n, C] = S), by vectorized binary search."""
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_C)
    at = first_at_least(key_ptr + n * S, S, j + (n * C).to(tl.int32), STEPS)
    tl.store(bound_ptr + n * (C + 1) + j, at, mask=j <= C)


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
def _run_means_kernel(sum_ptr, edge_ptr, bound_ptr, old_ptr, new_ptr, count_ptr, C, D, RUNS, RUN: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """One cluster: its sum (whole in one run, or its parts in the runs it spans, in order) over
    its size, or - empty - the old centroid."""
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
    else:
        out = tl.load(old_ptr + (n * C + c) * D + d, mask=d_ok, other=0.0)
    tl.store(new_ptr + (n * C + c) * D + d, out, mask=d_ok)
    tl.store(count_ptr + n * C + c, count.to(tl.float32))


def order_by_cluster(assignments: torch.Tensor, clusters: int):
    """Each row's tokens ordered by cluster (a stable sort): keys [N, S], row n's cluster ids
    ascending, each plus n * C; order [N, S] int64, the tokens in that order as positions in the
    flattened rows (n * S + token); and each cluster's first position in its row [N, C + 1] int32
    (the last column S; found by binary search). The keys come from one pass over the
    assignments (their conversion and the row's offset in one launch). Where N * C fits int16
    the keys are int16 and every row is sorted at once as one flat array: two radix passes, where
    torch's sort of rows adds a pass pairing each element with its row and one unpacking them
    (benchmarks/sort_variants.py); otherwise int32 keys, sorted a row at a time."""
    n, s = assignments.shape
    flat = n * clusters <= 1 << 15
    keys = torch.empty(n, s, dtype=torch.int16 if flat else torch.int32, device=assignments.device)
    if assignments.stride(1) != 1:
        assignments = assignments.contiguous()
    _sort_keys_kernel[(n, triton.cdiv(s, SORT_KEYS_BLOCK))](assignments, keys, s, assignments.stride(0), clusters,
                                                           BLOCK=SORT_KEYS_BLOCK, num_warps=4)
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
    _run_means_kernel[(n, c)](sums, edges, bounds, centroids.float().contiguous(), new, counts, c, d, runs,
                              RUN=RUN_TOKENS, BLOCK_D=block_d, num_warps=4)
    return new, counts


def update_triton(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    scale: torch.Tensor | None = None,
    sums: ClusterSums | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`qkv.kernels.kmeans.update_torch` (deterministic): the means of the
    assignment pass's ``sums`` where it gathered them; otherwise the one-hot sums up to
    ONEHOT_MAX_CLUSTERS clusters, the sorted sums beyond (on an H200, 1.9x faster at 64
    clusters, 1.07x at 128, 1.2-1.8x slower at 256 with balanced clusters:
    bench_kmeans_update_h200.json)."""
    if sums is not None:
        return _means(sums, centroids)
    update = update_onehot if centroids.shape[1] <= ONEHOT_MAX_CLUSTERS else update_sorted
    return update(x, assignments, centroids, scale)
