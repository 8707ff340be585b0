"""Triton's pre-launch host work for a decoding step's two launches, measured on the CPU.

A Triton launch first binds its arguments and specializes every one of them (a tensor's dtype and
16-byte alignment, an integer's divisibility by 16), then looks its compiled kernel up by that
specialization; only then does the driver launch it. On a GPU's host that work is part of each
of the decode path's two launches a layer (``launch_cost.py`` times whole launches there). This
runs the installed Triton's own binder (``create_function_from_signature``, as ``JITFunction``
builds it for the CUDA backend) and cache-key function on the arguments ``decode_triton`` passes
for one token of a Llama-shaped layer (4 query heads, 1 KV head of 128, a 4,096-token ``qvg``
span plan and a full-precision tail), so a change to the kernels' signatures can be judged where
no GPU is: per call, the median, and the cost of one tensor and one integer argument alone; and
what ``decode_triton`` pays instead, its launcher's own key and lookup (qkv.kernels.triton.launch),
which then launches the compiled kernel. The launch itself and the driver calls are not in it.

    PYTHONPATH=benchmarks:. python3 benchmarks/launch_binder.py --out benchmarks/results/launch_binder_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from common import write_json
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import compute_cache_key, create_function_from_signature, native_specialize_impl

import qkv
from qkv.kernels.triton import decode
from qkv.kernels.triton.launch import Launcher


class Captured:
    """A kernel whose launches are recorded with their arguments, not run."""

    def __init__(self, name: str, calls: dict) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls[self.name] = (args, kwargs)

        return launch


def decode_launches() -> dict:
    """The decode and merge kernels' arguments for one token over a qvg span and a tail."""
    calls = {}
    with mock.patch.multiple(decode, decode_kernel=Captured("decode", calls), merge_kernel=Captured("merge", calls)):
        cache = qkv.KVCache(qkv.build_policy("qvg", clusters=16), span_tokens=4096, num_layers=1)
        k = torch.randn(1, 1, 4096 + 100, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
        cache.append(0, k, k.clone())
        q = torch.randn(1, 4, 1, 128).bfloat16()
        decode.decode_triton(q, cache.layer(0).attention_segments())
    return calls


def median_us(fn, n: int = 5000) -> float:
    for _ in range(200):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def binder_cost(kernel, args: tuple, kwargs: dict) -> dict:
    """Median host time of binding and keying one launch of ``kernel`` (as ``JITFunction.run`` does)."""
    binder = create_function_from_signature(kernel.signature, kernel.params, CUDABackend)
    keys: dict = {}
    kwargs = {**kwargs, "debug": False, "instrumentation_mode": ""}  # what run() adds

    def bind_and_key():
        _, specialization, options = binder(*args, **kwargs)
        compute_cache_key(keys, specialization, options)

    tensors = sum(isinstance(a, torch.Tensor) for a in args)
    return {"args": len(args), "tensor_args": tensors, "keyword_args": len(kwargs) - 2,
            "bind_us": median_us(lambda: binder(*args, **kwargs)), "bind_and_key_us": median_us(bind_and_key)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    calls = decode_launches()
    rows = {name: binder_cost(getattr(decode, f"{name}_kernel").jit, *call) for name, call in calls.items()}
    for name, (call_args, call_kwargs) in calls.items():  # qkv's launcher instead: its key and lookup
        launcher = Launcher(getattr(decode, f"{name}_kernel").jit)
        launcher._pick(call_args)
        kept = {launcher.key(call_args, call_kwargs): None}
        rows[name]["launcher_key_and_lookup_us"] = median_us(lambda: kept.get(launcher.key(call_args, call_kwargs)))
    t = torch.empty(8, dtype=torch.bfloat16)
    rows["one_tensor_argument_us"] = median_us(lambda: native_specialize_impl(CUDABackend, t, False, True, True))
    rows["one_int_argument_us"] = median_us(lambda: native_specialize_impl(CUDABackend, 4096, False, True, True))
    print(rows)
    write_json(args.out, {"device": "cpu", "threads": torch.get_num_threads(), **rows})


if __name__ == "__main__":
    main()
