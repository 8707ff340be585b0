"""The tokens of each row ordered by cluster, stably, by a counting sort: what the sorted k-means
update reads (kmeans.py), twin of ``torch.sort(assignments, stable=True)`` plus each cluster's
first position.

Three launches, none of them a full sort: every segment of SEGMENT tokens counts its cluster ids
(a histogram); one program per row turns the counts into each cluster's first position in the
row (``bounds``) and each segment's first slot per cluster; every segment then writes its tokens
to their slots in token order (a token's slot: its segment's slot for its cluster, plus the
tokens of that cluster before it in the segment, STEP tokens a step). The result is the stable
sort's, bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# tokens per counting / writing program (a row of up to MAX_SEGMENTS segments; longer rows take
# longer segments) and per step of the writing loop (a STEP x STEP comparison ranks a step's tokens)
SEGMENT = 2048
MAX_SEGMENTS = 64
STEP = 128


@triton.jit
def _counts(a, ok, BLOCK_C: tl.constexpr):
    """How many of the cluster ids ``a`` (where ``ok``) fall in each of BLOCK_C clusters."""
    hist = tl.histogram(tl.where(ok, a, 0), BLOCK_C)
    pads = tl.sum((~ok).to(tl.int32), axis=0)  # counted in cluster 0
    return hist - tl.where(tl.arange(0, BLOCK_C) == 0, pads, 0)


@triton.jit
def _count_kernel(a_ptr, cnt_ptr, S, A_N, SEG, SEGS, C, BLOCK_C: tl.constexpr, STEP: tl.constexpr):
    """counts[n, g, c]: the tokens of segment g of row n in cluster c."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    total = tl.zeros((BLOCK_C,), tl.int32)
    for t0 in range(g * SEG, tl.minimum(g * SEG + SEG, S), STEP):
        t = t0 + tl.arange(0, STEP)
        ok = t < S
        total += _counts(tl.load(a_ptr + n * A_N + t, mask=ok, other=0).to(tl.int32), ok, BLOCK_C)
    c = tl.arange(0, BLOCK_C)
    tl.store(cnt_ptr + (n * SEGS + g) * C + c, total, mask=c < C)


@triton.jit
def _slots_kernel(cnt_ptr, slot_ptr, bound_ptr, S, SEGS, C, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row n: bounds[n, c], cluster c's first position (bounds[n, C] = S), and slots[n, g, c],
    segment g's first position for cluster c (after the segments before it)."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    c = tl.arange(0, BLOCK_C)
    at = (n * SEGS + g[:, None]) * C + c[None, :]
    ok = (g < SEGS)[:, None] & (c < C)[None, :]
    counts = tl.load(cnt_ptr + at, mask=ok, other=0)
    sizes = tl.sum(counts, axis=0)
    first = tl.cumsum(sizes, axis=0) - sizes
    tl.store(bound_ptr + n * (C + 1) + c, first, mask=c < C)
    tl.store(bound_ptr + n * (C + 1) + C, S)
    tl.store(slot_ptr + at, first[None, :] + tl.cumsum(counts, axis=0) - counts, mask=ok)


@triton.jit
def _write_kernel(a_ptr, slot_ptr, key_ptr, order_ptr, S, A_N, SEG, SEGS, C,
                  BLOCK_C: tl.constexpr, STEP: tl.constexpr):
    """Segment g of row n: each token's cluster id and index at its slot, in token order."""
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    nxt = tl.load(slot_ptr + (n * SEGS + g) * C + c, mask=c < C, other=0)  # next free slot per cluster
    i = tl.arange(0, STEP)
    for t0 in range(g * SEG, tl.minimum(g * SEG + SEG, S), STEP):
        t = t0 + i
        ok = t < S
        a = tl.load(a_ptr + n * A_N + t, mask=ok, other=0).to(tl.int32)
        earlier = (a[:, None] == a[None, :]) & (i[None, :] < i[:, None])  # same cluster, before it in the step
        slot = tl.gather(nxt, a, 0) + tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(key_ptr + n * S + slot, a.to(key_ptr.dtype.element_ty), mask=ok)
        tl.store(order_ptr + n * S + slot, t, mask=ok)
        nxt += _counts(a, ok, BLOCK_C)


def order_by_cluster(assignments: torch.Tensor, clusters: int, key_dtype: torch.dtype):
    """Row by row, the cluster ids [N, S] in ``key_dtype`` in ascending order, the token indices
    [N, S] int32 in that order (stable: a cluster's tokens in token order), and each cluster's
    first position [N, C + 1] int32 (the last column S), for ``assignments`` [N, S] of ids in
    [0, clusters)."""
    a = assignments if assignments.stride(1) == 1 else assignments.contiguous()
    n, s = a.shape
    seg = max(SEGMENT, triton.cdiv(triton.cdiv(s, MAX_SEGMENTS), STEP) * STEP)
    segs = triton.cdiv(s, seg)
    block_c = triton.next_power_of_2(clusters)
    counts = torch.empty(n, segs, clusters, dtype=torch.int32, device=a.device)
    _count_kernel[(n, segs)](a, counts, s, a.stride(0), seg, segs, clusters, BLOCK_C=block_c, STEP=STEP, num_warps=4)
    slots = torch.empty_like(counts)
    bounds = torch.empty(n, clusters + 1, dtype=torch.int32, device=a.device)
    _slots_kernel[(n,)](counts, slots, bounds, s, segs, clusters, BLOCK_G=triton.next_power_of_2(segs),
                        BLOCK_C=block_c, num_warps=4)
    keys = torch.empty(n, s, dtype=key_dtype, device=a.device)
    order = torch.empty(n, s, dtype=torch.int32, device=a.device)
    _write_kernel[(n, segs)](a, slots, keys, order, s, a.stride(0), seg, segs, clusters, BLOCK_C=block_c, STEP=STEP,
                             num_warps=4)
    return keys, order, bounds
