"""The staged attention over Hadamard-rotated spans: rotated back or read in their stored basis.

At a Wan-1.3B video chunk's shapes (12 heads x 128; two spans of 8 chunks, 37,440 tokens each, and
a 4,680-token chunk of queries), for rtn (no rotation) and quarot (keys and values rotated):

- ``decompress``: GPU time (replayed from a CUDA graph) of the span decompression of both spans
  (``kernels.decompress_spans``, the device's tile) with the rotations undone in the launch
  (``rotated=(False, False)``: each tile rotated back on tensor cores) and left in the stored basis
  (``rotated=(True, True)``), K and V;
- ``staged``: time of ``attention_staged`` over the two spans (each its own group: the staged
  path's group limit set to one span), which reads a group of rotated spans in their stored basis
  with rotated queries, against the same call with every group rotated back (the path before).

    PYTHONPATH=. python3 benchmarks/staged_rotation.py --out benchmarks/results/staged_rotation_h200.json
"""

from __future__ import annotations

import importlib
import json

import torch

from common import clustered, gpu_main_args, gpu_ms, ms, overridden, write_json

import qkv
from qkv.kernels import CompressedSpan, SpanPlan

attention_module = importlib.import_module("qkv.kernels.attention")  # the package's attention() shadows it

HEADS, HEAD_DIM, CHUNK, SPAN_CHUNKS = 12, 128, 3 * 1560, 8
BASES = {"rotated_back": (False, False), "stored": (True, True)}


def main() -> None:
    args = gpu_main_args(__doc__, "staged_rotation.py")
    span_tokens = SPAN_CHUNKS * CHUNK
    q = clustered((1, HEADS, CHUNK, HEAD_DIM), seed=99, scale=0.1)
    rows = []
    for name in ("rtn", "quarot"):
        policy = qkv.build_policy(name)
        spans = [CompressedSpan(policy.compress(clustered((1, HEADS, span_tokens, HEAD_DIM), seed=2 * i, scale=2.0),
                                                clustered((1, HEADS, span_tokens, HEAD_DIM), seed=2 * i + 1)))
                 for i in range(2)]
        plan = SpanPlan(spans)
        k, v = (torch.empty(1, HEADS, plan.tokens, HEAD_DIM, dtype=torch.bfloat16, device=q.device) for _ in range(2))
        row = {"policy": name, "rotations": list(plan.rotations())}
        for basis, rotated in BASES.items():
            row[f"decompress_{basis}_ms"] = gpu_ms(lambda r=rotated: qkv.kernels.decompress_spans(plan, k, v, rotated=r))
        del k, v
        with overridden(attention_module, {"STAGE_TOKENS": span_tokens}):
            row["staged_ms"] = ms(lambda: qkv.kernels.attention_staged(q, [plan]), warmup=5, rep=100)
            with overridden(SpanPlan, {"rotations": lambda self: (False, False)}):  # every group rotated back
                row["staged_rotated_back_ms"] = ms(lambda: qkv.kernels.attention_staged(q, [SpanPlan(spans)]),
                                                   warmup=5, rep=100)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(args.out, {"shapes": {"heads": HEADS, "head_dim": HEAD_DIM, "queries": CHUNK, "span_tokens": span_tokens,
                                     "spans": 2}, "rows": rows})


if __name__ == "__main__":
    main()
