"""Host time of one token-by-token decoding step per layer: the cache write, and the attention call.

Each generated token appends a one-token chunk to every layer and attends to the layer's history;
the cache's Python work for it (checks, the tail buffer, finding the span or residual group to
compress, gathering the attention segments and sizing the decode launch) is paid per layer and
token, on the host, whatever the GPU does: ``generate`` is host-bound (docs/attention.md). For each
policy, after a ``--prompt``-token prompt (4,096 by default; 8 KV heads x 128, bf16, Llama-3-8B's
layer), the mean time per step over ``--appends`` steps, the median of ``--repeats`` such means, with the compressions those
steps trigger included:

- ``us_per_append``: :meth:`LayerCache.append` of the token;
- ``us_per_step``: the append and the attention of 32 query heads to the layer as
  :meth:`LayerCache.attend` computes it on a GPU (its segments, then the Triton decode path);
- ``us_per_step_late``: the same once ``--late`` tokens were generated (8,192 by default: KIVI
  has then made a span of every 32 of them, and the steps must not slow down with the count);
- ``torch_ops_per_step`` and ``launches_per_step``: the torch operators and Triton kernels one
  step calls (on a GPU each op is a launch or a view).

    PYTHONPATH=. python3 benchmarks/bench_append.py --out benchmarks/results/bench_append_cpu.json
    PYTHONPATH=. python3 benchmarks/bench_append.py --prompt 10 --out benchmarks/results/bench_append_short_prompt_cpu.json

On a GPU (``--device cuda``) every step is followed by a synchronize, so the time includes what the
GPU runs for it. On the CPU, where Triton has no driver, the step's two kernel launches are
recorded instead of run, and the value checks are queued and batched as on a GPU (their
reductions run on the CPU; the rest of the decode path runs as on a GPU); the tensors' own work
(copies, the checks' reductions, compressing a group) is part of the time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time
from unittest import mock

import torch
from common import environment, write_json
from torch.utils._python_dispatch import TorchDispatchMode

import qkv
from qkv import kernels
from qkv import validation
from qkv.kernels.triton import decode

KV_HEADS, HEADS, HEAD_DIM = 8, 32, 128
# policy -> KVCache options: KIVI's residual window (a group compressed every 32 tokens), RTN and
# bf16 spans of 256 tokens (every 256 appends one span)
CASES = {"kivi": {}, "rtn": {"span_tokens": 256}, "bf16": {"span_tokens": 256}}


class Recorded:
    """A Triton kernel whose launches are counted, not run (Triton has no CPU driver)."""

    def __init__(self, name: str, counts: collections.Counter) -> None:
        self.name, self.counts = name, counts

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1

        return launch


class CountOps(TorchDispatchMode):
    """Counts the torch operators dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(policy: str, options: dict, device: str, appends: int, late: int, prompt_tokens: int) -> dict:
    """Mean seconds per one-token append, and per append and attend, on a prompted layer (also
    once ``late`` tokens were generated); the torch ops of one step and the number of steps that
    attended."""
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = [(torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen, device=device).bfloat16(),) * 2
              for _ in range(appends)]
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen, device=device).bfloat16()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    # the decode path as LayerCache.attend takes it on a GPU; on the CPU its twin would run instead
    backend = "auto" if device == "cuda" else "triton"
    prompt = [torch.randn(1, KV_HEADS, prompt_tokens, HEAD_DIM, generator=gen, device=device).bfloat16() for _ in range(2)]

    attended = 0

    def attend(layer):
        nonlocal attended
        attended += 1
        return kernels.attention(q, layer.attention_segments(), backend=backend, method="decode")

    def timed(layer, attending):
        start = time.perf_counter()
        for one in tokens:
            layer.append(*one)
            if attending:
                attend(layer)
            sync()
        return (time.perf_counter() - start) / appends

    for name, attending in (("append", False), ("step", True)):
        layer = qkv.KVCache(policy, num_layers=1, **options).layer(0)
        layer.append(*prompt)
        for one in tokens[:64]:  # warm-up
            layer.append(*one)
            if attending:
                attend(layer)
        sync()
        out[name] = timed(layer, attending)
    for i in range(late - appends - 64):  # the same layer, on to ``late`` generated tokens
        layer.append(*tokens[i % appends])
        attend(layer)
    out["late"] = timed(layer, True)
    ops = CountOps()
    with ops:
        layer.append(*tokens[0])
        attend(layer)
    out["torch_ops"], out["attended"] = ops.count, attended
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--appends", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--late", type=int, default=8192, help="generated tokens before the late steps are timed")
    parser.add_argument("--prompt", type=int, default=4096, help="tokens of the prompt (one chunk) before the steps")
    args = parser.parse_args()
    launches = collections.Counter()
    rows = []
    with mock.patch.multiple(decode, decode_kernel=Recorded("decode", launches), merge_kernel=Recorded("merge", launches)) \
            if args.device != "cuda" else contextlib.nullcontext(), \
            mock.patch.object(validation, "deferred", lambda t: True):
        for policy, options in CASES.items():
            runs = [measure(policy, options, args.device, args.appends, args.late, args.prompt) for _ in range(args.repeats)]
            steps = sum(r["attended"] for r in runs)
            rows.append({
                "policy": policy, "options": options,
                "us_per_append": statistics.median(r["append"] for r in runs) * 1e6,
                "us_per_append_repeats": [r["append"] * 1e6 for r in runs],
                "us_per_step": statistics.median(r["step"] for r in runs) * 1e6,
                "us_per_step_repeats": [r["step"] * 1e6 for r in runs],
                "late_tokens": args.late,
                "us_per_step_late": statistics.median(r["late"] for r in runs) * 1e6,
                "us_per_step_late_repeats": [r["late"] * 1e6 for r in runs],
                "torch_ops_per_step": runs[0]["torch_ops"],
                "launches_per_step": {k: n / steps for k, n in launches.items()} if launches else None,
            })
            launches.clear()
            print(f"{policy} {options}: {rows[-1]['us_per_append']:.1f} us per append, {rows[-1]['us_per_step']:.1f} "
                  f"us per step ({rows[-1]['us_per_step_late']:.1f} after {args.late} tokens), "
                  f"{rows[-1]['torch_ops_per_step']} torch ops", flush=True)
    write_json(args.out, {"environment": {**environment(), "device": args.device,
                                          "threads": torch.get_num_threads()}, "prompt": args.prompt, "rows": rows})


if __name__ == "__main__":
    main()
