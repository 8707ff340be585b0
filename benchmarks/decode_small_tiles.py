"""Whether the decode kernel is right with key tiles below ``decode.GPU_MIN_BLOCK_N`` on this GPU.

A GPU refuses decode tiles of fewer than 32 keys: on an H100 16-key tiles gave wrong outputs for
every layout of per-token codes (cause not found). This lifts that limit for the run and prints,
per preset and head dim, the max error of one query (4 query heads on 2 KV heads, one 200-token
span) against an fp32 attention over the span decompressed in fp32, for 16-key tiles of 1, 2 and
4 warps and a 32-key tile of 4 warps, so that a later Triton or GPU can be checked before the
limit is lowered. Then the key tile decode alone (``tile.decode_tile`` in a kernel of its own,
every tile of the span's keys stored, no products or softmax), per preset, tile size, warps and
arithmetic, against the 32-key tile's fp32 decode (itself against the decompressed keys): where
only the whole kernel is wrong, the tile decode is not the cause. Needs a GPU (``--tiles-only`` runs the second part in Triton's interpreter too).

    PYTHONPATH=.:tests/kernels python3 benchmarks/decode_small_tiles.py | tee benchmarks/results/decode_small_tiles_h100.txt
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from test_attention import materialized, policy, randn

from qkv import kernels
from qkv.kernels import CompressedSpan, SpanPlan
from qkv.kernels.triton import decode
from qkv.kernels.triton.attention_kernel import S_K, S_TOKENS
from qkv.kernels.triton.tile import decode_tile, record_source
from qkv.kernels.triton.tiles import DecodeTile

PRESETS = ["qvg", "rtn", "quarot", "kivi", "bf16", "qvg-pro", "qvg-int4"]
TILES = [(16, 1), (16, 2), (16, 4), (32, 4)]  # (keys a tile, warps)


@triton.jit
def _key_tiles(span_ptr, out_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, KV_T: tl.constexpr,
               ARITH: tl.constexpr):
    """Key tile ``program_id(0)`` of (batch, head) ``program_id(1)`` of span 0 of a span table,
    decoded and stored into out [B * H, S, D] fp32."""
    t0 = tl.program_id(0) * BLOCK_N
    n = tl.program_id(1).to(tl.int64)
    S = tl.load(span_ptr + S_TOKENS).to(tl.int32)
    x = decode_tile(record_source(span_ptr + S_K, n, D, K, KV_T), t0, S, K, D, BLOCK_N, D, K.HAS_FP, ARITH,
                    not K.TOKEN_AXIS)
    tok = t0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    tl.store(out_ptr + (n * S + tok[:, None]) * D + d[None, :], x.to(tl.float32), mask=(tok < S)[:, None])


def tiles(device: str, presets: list[str], dims: list[int]) -> None:
    """The key tile decode alone, per preset, head dim, tile size, warps and arithmetic (see the
    module docstring)."""
    ariths = ("fma", "bf16x2") if device == "cuda" else ("fma",)
    for name in presets:
        for d in dims:
            k = randn(1, 1, 2, 200, d, scale=2.0).to(device)
            span = CompressedSpan(policy(name, d).compress(k, randn(2, 1, 2, 200, d).to(device)), 0)
            plan = SpanPlan([span])
            table = decode.plan_table(plan, torch.device(device), 64)
            if table is None:
                continue
            group = table.groups[0]
            ref = kernels.decompress(span.ckv.k).float().flatten(0, 1)
            outs = {}
            for bn, warps in TILES[::-1]:  # the 32-key tile first: the others are compared with it
                for arith in ariths:
                    out = torch.zeros_like(ref)
                    _key_tiles[(triton.cdiv(200, bn), ref.shape[0])](
                        group.table, out, D=d, BLOCK_N=bn, K=group.layouts[0], KV_T=tl.bfloat16, ARITH=arith,
                        num_warps=warps)
                    outs[bn, warps, arith] = out
            base = outs[TILES[-1] + ("fma",)]
            errors = [f"{bn}/{w}/{a}:{(out - base).abs().max().item():.4f}" for (bn, w, a), out in outs.items()]
            # quarot's keys decode in the rotated basis, the decompressed ones are rotated back
            print("tile", name, d, f"32-key fma vs decompressed {(base - ref).abs().max().item():.4f};",
                  "vs the 32-key fma tile", *errors, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles-only", action="store_true", help="only the tile decode (runs without a GPU too)")
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    args = parser.parse_args()
    if args.tiles_only:
        tiles("cuda" if torch.cuda.is_available() else "cpu", args.presets, args.dims)
        return
    if not torch.cuda.is_available():
        raise SystemExit("decode_small_tiles.py needs a GPU")
    decode.GPU_MIN_BLOCK_N = min(bn for bn, _ in TILES)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name in args.presets:
        for d in args.dims:
            pol = policy(name, d)
            segs = [CompressedSpan(pol.compress(randn(1, 1, 2, 200, d, scale=2.0), randn(2, 1, 2, 200, d)), 0)]
            q = randn(3, 1, 4, 1, d)
            ref = F.scaled_dot_product_attention(q.float(), *materialized(segs, fp32=True), enable_gqa=True)
            errors = []
            for bn, warps in TILES:
                tile = DecodeTile(block_n=bn, piece=64, max_rows=16, warps=warps, stages=(1,), waves=4)
                out = decode.decode_triton(q, [SpanPlan(segs)], tile=tile)
                errors.append(f"{bn}/{warps}:{(out.float() - ref).abs().max().item():.4f}")
            print(name, d, *errors, flush=True)
    tiles("cuda", args.presets, args.dims)


if __name__ == "__main__":
    main()
