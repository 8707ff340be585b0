"""Triton k-means kernels, twins of qkv/kernels/kmeans.py.

- assignment: nearest centroid without materializing the [S, C] distance matrix (tiles of
  centroids stream through; ||c||^2 - 2 x.c on bf16 tensor cores with x and c each split into a
  high and a low bf16 part, three products: about 16 significant bits, ~1e-5 relative error in
  x.c). Near-ties (distances equal within that error) may pick another centroid than the fp32
  reference; the chosen distance is the minimum within that error. x is read in its own dtype.
- update: deterministic, no floating-point atomics: tokens are ordered by cluster (a stable sort)
  and each cluster's tokens are summed in that fixed order; results can differ from the
  reference's one-hot matmul only by fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.triton.bits import round_to_bf16


@triton.jit
def split(a):
    """fp32 tile -> (high, low) bf16-valued fp32 tiles with high + low == a to ~16 bits."""
    hi = round_to_bf16(a)
    return hi, round_to_bf16(a - hi)


@triton.jit
def split_dot(ah, al, bh, bl, A_EXACT: tl.constexpr, EMULATE: tl.constexpr):
    """(ah + al) @ (bh + bl) less al @ bl, as bf16 tensor-core products accumulated in fp32
    (al is skipped when A_EXACT: a was bf16 already). EMULATE (no GPU: Triton's interpreter has
    no bf16 dot) runs the same products as exact fp32 dots of the bf16-valued parts."""
    if EMULATE:
        out = tl.dot(ah, bh, input_precision="ieee") + tl.dot(ah, bl, input_precision="ieee")
        if not A_EXACT:
            out += tl.dot(al, bh, input_precision="ieee")
    else:
        ah16 = ah.to(tl.bfloat16)
        bh16 = bh.to(tl.bfloat16)
        out = tl.dot(ah16, bh16) + tl.dot(ah16, bl.to(tl.bfloat16))
        if not A_EXACT:
            out += tl.dot(al.to(tl.bfloat16), bh16)
    return out


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, idx_ptr, dist_ptr, S, C, D,
    X_EXACT: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    d_ok = d < D
    x = tl.load(x_ptr + (n * S + s[:, None]) * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    x = x.to(tl.float32)
    x_sq = tl.sum(x * x, axis=1)
    xh, xl = split(x)
    best = tl.full((BLOCK_S,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_S,), tl.int64)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        cent = tl.load(c_ptr + (n * C + c[:, None]) * D + d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        c_sq = tl.sum(cent * cent, axis=1)
        ch, cl = split(tl.trans(cent))
        dist = c_sq[None, :] - 2.0 * split_dot(xh, xl, ch, cl, X_EXACT, EMULATE)
        dist = tl.where(c_ok[None, :], dist, float("inf"))
        tile_best = tl.min(dist, axis=1)
        tile_i = tl.argmin(dist, axis=1).to(tl.int64) + c0
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_i = tl.where(better, tile_i, best_i)
    tl.store(idx_ptr + n * S + s, best_i, mask=s_ok)
    tl.store(dist_ptr + n * S + s, tl.maximum(best + x_sq, 0.0), mask=s_ok)


@triton.jit
def _update_kernel(
    x_ptr, order_ptr, start_ptr, count_ptr, old_ptr, new_ptr, S, C, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    start = tl.load(start_ptr + n * C + c)
    count = tl.load(count_ptr + n * C + c)
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for t0 in range(0, count, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < count
        tok = tl.load(order_ptr + n * S + start + t, mask=t_ok, other=0)
        xs = tl.load(x_ptr + (n * S + tok[:, None]) * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        acc += xs.to(tl.float32)
    total = tl.sum(acc, axis=0)
    mean = tl.math.div_rn(total, tl.maximum(count, 1).to(tl.float32))
    old = tl.load(old_ptr + (n * C + c) * D + d, mask=d_ok, other=0.0)
    tl.store(new_ptr + (n * C + c) * D + d, tl.where(count > 0, mean, old), mask=d_ok)


def assign_supports(x, centroids) -> str | None:
    if x.shape[-1] > 1024:
        return f"D={x.shape[-1]} is larger than 1024"
    return None


def assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`qkv.kernels.kmeans.assign_torch`."""
    x, centroids = x.contiguous(), centroids.float().contiguous()
    n, s, d = x.shape
    c = centroids.shape[1]
    idx = torch.empty(n, s, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, s, dtype=torch.float32, device=x.device)
    block_d = max(16, triton.next_power_of_2(d))
    block_c = 64 if block_d <= 128 else 32
    block_s = 256 if block_d <= 128 else 64  # the H100 tile sweep's best (benchmarks/results)
    _assign_kernel[(n, triton.cdiv(s, block_s))](
        x, centroids, idx, dist, s, c, d,
        X_EXACT=x.dtype == torch.bfloat16, EMULATE=x.device.type != "cuda",
        BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=8,
    )
    return idx, dist


def update_triton(
    x: torch.Tensor, assignments: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`qkv.kernels.kmeans.update_torch` (deterministic)."""
    x, centroids = x.contiguous(), centroids.float().contiguous()
    n, s, d = x.shape
    c = centroids.shape[1]
    assign = assignments.long()
    order = torch.sort(assign, dim=1, stable=True).indices.contiguous()
    counts = torch.zeros(n, c, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign))  # integer adds: order-independent
    starts = (counts.cumsum(1) - counts).contiguous()
    new = torch.empty_like(centroids)
    block_d = triton.next_power_of_2(d)
    _update_kernel[(n, c)](
        x, order, starts, counts, centroids, new, s, c, d, BLOCK_T=32, BLOCK_D=block_d,
    )
    return new, counts.float()
