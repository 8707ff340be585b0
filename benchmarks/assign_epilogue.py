"""Is the k-means assignment bound by its min/argmin epilogue? Two rewrites of its inner loop,
timed against the kernel as it is (``qkv.kernels.triton.kmeans.assign.assign_triton``) on one GPU:

- ``direct``: the bf16 tokens and centroids go to the tensor-core product as loaded (the kernel
  widens them to fp32 first, for its shared emulation path, and narrows them again);
- ``packed``: the running min/argmin over each distance tile as one integer min of keys that hold
  the distance's bits (order-preserving for floats) with the centroid index (C <= 256) in their 8
  low bits: 1, the distance read back from the key (8 low bits of its mantissa cut); 2, the
  distance from a second, float min.

Each at several tiles (tokens, clusters, warps), LongCat-Video's span and a Self-Forcing history
(bf16 tokens gathered around 256 centroids, a row factor, as ``tune_tiles.py --kernel assign``),
GPU time from a CUDA graph of 50 calls (best of 5), with the share of tokens whose centroid
agrees with the kernel's and the largest relative difference of the distances.

    PYTHONPATH=.:benchmarks python3 benchmarks/assign_epilogue.py --out benchmarks/results/assign_epilogue_h100.json
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from common import gpu_main_args, write_json

from qkv.kernels.triton.kmeans.assign import assign_triton
from qkv.kernels.triton.kmeans.nearest import _prepare_kernel
from qkv.kernels.triton.tiles import AssignTile

SHAPES = {"longcat_video": (32, 29640, 128, 256), "self_forcing": (12, 37440, 128, 256)}
TILES = [AssignTile(128, 32, 4), AssignTile(128, 64, 4), AssignTile(128, 64, 8), AssignTile(256, 64, 8),
         AssignTile(64, 32, 4), AssignTile(128, 128, 8), AssignTile(256, 128, 8)]


@triton.jit
def _variant_kernel(x_ptr, f_ptr, c_ptr, csq_ptr, idx_ptr, dist_ptr, S, C, D, XN, XS,
                DIRECT: tl.constexpr, PACKED: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    d_ok = d < D
    xb = tl.load(x_ptr + n * XN + s[:, None].to(tl.int64) * XS + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    f = tl.load(f_ptr + n)
    x = xb.to(tl.float32)
    x_sq = tl.sum((x * f) * (x * f), axis=1)
    best = tl.full((BLOCK_S,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_S,), tl.int32)
    best_key = tl.full((BLOCK_S,), 0x7FFFFFFF, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        cent = tl.load(c_ptr + (n * C + c[None, :]) * D + d[:, None], mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        if DIRECT:
            dist = tl.dot(xb, cent)
        else:
            dist = tl.dot(x.to(tl.bfloat16), cent.to(tl.float32).to(tl.bfloat16))
        dist = dist * f + tl.load(csq_ptr + n * C + c, mask=c_ok, other=float("inf"))[None, :]
        if PACKED > 0:
            b = dist.to(tl.int32, bitcast=True)
            key = ((b ^ ((b >> 31) & 0x7FFFFFFF)) & -256) | c[None, :]
            best_key = tl.minimum(best_key, tl.min(key, axis=1))
            if PACKED == 2:
                best = tl.minimum(best, tl.min(dist, axis=1))
        else:
            tile_best, tile_i = tl.min(dist, axis=1, return_indices=True)
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_i = tl.where(better, tile_i + c0, best_i)
    if PACKED > 0:
        best_i = best_key & 255
        if PACKED == 1:
            v = best_key & -256
            best = (v ^ ((v >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    tl.store(idx_ptr + n * S + s, best_i.to(tl.int64), mask=s_ok)
    tl.store(dist_ptr + n * S + s, tl.maximum(best + x_sq, 0.0), mask=s_ok)


def variant_assign(x, cents, factor, tile, direct, packed):
    """``assign_triton`` with ``_variant_kernel`` in place of its assignment kernel."""
    n, s, d = x.shape
    c = cents.shape[1]
    neg2 = torch.empty(n, c, d, dtype=torch.bfloat16, device=x.device)
    c_sq = torch.empty(n, c, dtype=torch.float32, device=x.device)
    _prepare_kernel[(triton.cdiv(n * c, 32),)](cents, neg2, c_sq, n * c, c, c, d, EMULATE=False, BLOCK_M=32, BLOCK_D=d)
    idx = torch.empty(n, s, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, s, dtype=torch.float32, device=x.device)
    _variant_kernel[(n, triton.cdiv(s, tile.tokens))](x, factor, neg2, c_sq, idx, dist, s, c, d, x.stride(0), x.stride(1),
                                                  DIRECT=direct, PACKED=packed, BLOCK_S=tile.tokens,
                                                  BLOCK_C=tile.clusters, BLOCK_D=d, num_warps=tile.warps)
    return idx, dist


def graph_ms(fn, reps: int = 50) -> float:
    """GPU milliseconds a call of ``fn``: ``reps`` calls captured in one CUDA graph, the best of 5
    replays."""
    for _ in range(5):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def main() -> None:
    args = gpu_main_args(__doc__, "assign_epilogue.py")
    rows = []
    for name, (r, s, d, c) in SHAPES.items():
        torch.manual_seed(0)
        cents = torch.randn(r, c, d, device="cuda")
        near = torch.randint(0, c, (s,), device="cuda")
        x = (cents[:, near] + 0.3 * torch.randn(r, s, d, device="cuda")).bfloat16()
        factor = torch.full((r,), 0.5, device="cuda")
        ref_idx, ref_dist = assign_triton(x, cents, factor)
        flops = 2 * r * s * c * d
        base = graph_ms(lambda: assign_triton(x, cents, factor))
        print(f"{name}: repo default tile {base:.4f} ms ({flops / base / 1e9:.0f} TFLOP/s)", flush=True)
        rows.append({"shape": name, "variant": "repo", "tile": None, "ms": base})
        for tile in TILES:
            for direct in (False, True):
                for packed in (0, 1, 2):
                    try:
                        idx, dist = variant_assign(x, cents, factor, tile, direct, packed)
                        agree = (idx == ref_idx).float().mean().item()
                        derr = ((dist - ref_dist).abs() / ref_dist.abs().clamp_min(1e-3)).max().item()
                        ms = graph_ms(lambda: variant_assign(x, cents, factor, tile, direct, packed))
                    except Exception as e:  # noqa: BLE001 - a launch the GPU refuses is reported, the sweep goes on
                        print(name, tile, direct, packed, "failed", type(e).__name__, str(e)[:200], flush=True)
                        continue
                    rows.append({"shape": name, "tile": [tile.tokens, tile.clusters, tile.warps], "direct": direct,
                                 "packed": packed, "ms": ms, "agree": agree, "max_rel_dist_err": derr})
                    print(f"  {tile.tokens:3d} {tile.clusters:3d} {tile.warps} direct={int(direct)} packed={packed}: "
                          f"{ms:.4f} ms ({flops / ms / 1e9:.0f} TFLOP/s) agree {agree:.5f} dist err {derr:.2e}",
                          flush=True)
        del x, cents
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
