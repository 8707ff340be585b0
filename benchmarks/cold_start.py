"""Triton compilations during a decoding loop: the kernel variants compiled, and the steps they stall.

Triton compiles a kernel again for every new class of its integer arguments that it specializes
(equal to 1, a multiple of 16, other). A decoding step passes token counts that change every step,
so with every argument specialized a new variant (seconds of compilation) appeared every few
hundred steps, in the middle of a generation. This runs a fresh process's first 1,100 one-token
steps (append, then ``kernels.attention(..., method="decode")`` for 32 query heads) on a layer
holding a 4,096-token prompt (8 KV heads x 128, bf16), each step synchronized and timed, and
prints the total time, the decode kernel's variants compiled and every step over 50 ms.
``specialized`` specializes every integer argument (as before the decode and merge kernels
declared their counts ``do_not_specialize``); ``new`` runs the kernels as they are. Run each in
its own process with an empty Triton cache, as a user's first run has::

    for mode in specialized new; do
      TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python3 benchmarks/cold_start.py $mode kivi "{}"
      TRITON_CACHE_DIR=$(mktemp -d) PYTHONPATH=. python3 benchmarks/cold_start.py $mode rtn "{'span_tokens': 256}"
    done
"""

from __future__ import annotations

import ast
import json
import sys
import time

import torch
from common import environment

import qkv
from qkv import kernels
from qkv.kernels.triton import decode_kernel as dk


def main() -> None:
    print(json.dumps(environment()), flush=True)  # what the numbers were measured on
    mode, policy, options = sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3])
    if mode == "specialized":
        for fn in (dk.decode_kernel, dk.merge_kernel):
            for p in fn.params:
                p.do_not_specialize = False
    layer = qkv.KVCache(policy, num_layers=1, **options).layer(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    layer.append(*[torch.randn(1, 8, 4096, 128, device="cuda", generator=g).bfloat16() for _ in range(2)])
    q = torch.randn(1, 32, 1, 128, device="cuda", generator=g).bfloat16()
    tokens = [torch.randn(1, 8, 1, 128, device="cuda", generator=g).bfloat16() for _ in range(1100)]
    times = []
    for t in tokens:
        torch.cuda.synchronize()
        start = time.perf_counter()
        layer.append(t, t)
        kernels.attention(q, layer.attention_segments(), method="decode")
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    slow = [(i, round(x, 2)) for i, x in enumerate(times) if x > 0.05]
    variants = len(dk.decode_kernel.device_caches[0][0])
    print(mode, policy, options, f"total {sum(times):.2f} s for {len(times)} steps; decode variants {variants}; "
          f"steps over 50 ms: {slow}", flush=True)


if __name__ == "__main__":
    main()
