"""Weighted D^2 sampling in rounds, Triton twin of :func:`qkv.kernels.kmeans.kmeanspp_torch`
(k-means++: a pick a round; k-means||'s reduction: a few picks a round).

One program per row makes all C picks, the row's weights, nearest distances and picked flags in
registers; a round ranks the scores over its draws and takes its picks in turn (a max reduction
each), then makes one pass over the row's points for each point's distance to the nearest of the
round's picks. Rounds of several picks take it as ``|p|^2 + |c|^2 - 2 p.c``, the products of a
few dims of every point with the round's picks a step on the tensor cores (16-bit points in their
own dtype, exact; fp32 points as tf32, exact for bf16-valued ones; fp32 sums; |p|^2 once per
row); a round of one pick reads the points transposed, [D, K], a few dims of every point a load,
and sums the squared differences in the layout of the row's state (no reduction across threads,
no barrier; a picked point is at 0 from itself exactly). The picks are the reference's wherever
the fp32 sums come out the same (exact for integer-valued points); otherwise a pick may differ
where two keys are within rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.kernels.kmeans import round_sizes
from qkv.kernels.triton.tiles import SeedTile, tile_for


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
