"""Whether the decode kernel is right with key tiles below ``decode.GPU_MIN_BLOCK_N`` on this GPU.

A GPU refuses decode tiles of fewer than 32 keys: on an H100 16-key tiles gave wrong outputs for
every layout of per-token codes (cause not found). This lifts that limit for the run and prints,
per preset and head dim, the max error of one query (4 query heads on 2 KV heads, one 200-token
span) against an fp32 attention over the span decompressed in fp32, for 16-key tiles of 1, 2 and
4 warps and a 32-key tile of 4 warps, so that a later Triton or GPU can be checked before the
limit is lowered. Needs a GPU.

    PYTHONPATH=.:tests/kernels python3 benchmarks/decode_small_tiles.py | tee benchmarks/results/decode_small_tiles_h100.txt
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_attention import materialized, policy, randn

from qkv.kernels import CompressedSpan, SpanPlan
from qkv.kernels.triton import decode
from qkv.kernels.triton.tiles import DecodeTile

PRESETS = ["qvg", "rtn", "quarot", "kivi", "bf16", "qvg-pro", "qvg-int4"]
TILES = [(16, 1), (16, 2), (16, 4), (32, 4)]  # (keys a tile, warps)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("decode_small_tiles.py needs a GPU")
    decode.GPU_MIN_BLOCK_N = min(bn for bn, _ in TILES)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for name in PRESETS:
        for d in (64, 128):
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


if __name__ == "__main__":
    main()
