"""Host time of one token-by-token append (LLM decoding's cache write) per layer.

Each generated token appends a one-token chunk to every layer; the cache's Python work for it
(checks, the tail buffer, finding the span or residual group to compress) is paid per layer and
token, on the host, whatever the GPU does. For each policy, after a 4,096-token prompt (8 KV heads
x 128, bf16, Llama-3-8B's layer), the mean time per append over ``--appends`` appends, the median
of ``--repeats`` such means, with the compressions those appends trigger included:

    PYTHONPATH=. python3 benchmarks/bench_append.py --out benchmarks/results/bench_append_cpu.json

On a GPU (``--device cuda``) every append is followed by a synchronize, so the time includes
what the GPU runs for it; on the CPU the tensors' own work (copies, the value check, compressing
a group) is part of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import environment, write_json

import qkv

# policy -> KVCache options: KIVI's residual window (a group compressed every 32 tokens), RTN and
# bf16 spans of 256 tokens (every 256 appends one span)
CASES = {"kivi": {}, "rtn": {"span_tokens": 256}, "bf16": {"span_tokens": 256}}


def per_append(policy: str, options: dict, device: str, appends: int) -> float:
    """Mean seconds per one-token append to a layer that holds a 4,096-token prompt."""
    gen = torch.Generator(device=device).manual_seed(0)
    k, v = (torch.randn(1, 8, 4096, 128, generator=gen, device=device).bfloat16() for _ in range(2))
    layer = qkv.KVCache(policy, num_layers=1, **options).layer(0)
    layer.append(k, v)
    tokens = [(torch.randn(1, 8, 1, 128, generator=gen, device=device).bfloat16(),) * 2 for _ in range(appends)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for one in tokens[:64]:  # warm-up
        layer.append(*one)
    sync()
    start = time.perf_counter()
    for one in tokens:
        layer.append(*one)
        sync()
    return (time.perf_counter() - start) / appends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--appends", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for policy, options in CASES.items():
        means = [per_append(policy, options, args.device, args.appends) for _ in range(args.repeats)]
        rows.append({"policy": policy, "options": options, "us_per_append": statistics.median(means) * 1e6,
                     "us_per_append_repeats": [m * 1e6 for m in means]})
        print(f"{policy} {options}: {rows[-1]['us_per_append']:.1f} us per append", flush=True)
    write_json(args.out, {"environment": {**environment(), "device": args.device,
                                          "threads": torch.get_num_threads()}, "rows": rows})


if __name__ == "__main__":
    main()
