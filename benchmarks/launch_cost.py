"""Host time of the pieces of a decoding step on a GPU: the decode path, one Triton launch through
the JIT and through the compiled kernel directly, the segments, an append.

A layer of 8 KV heads x 128 with a 2,048-token bf16 prompt (kivi; qvg with 16 clusters and
1,024-token spans), 32 query heads, one query: each row is the host time of one call, the mean of
2,000 calls (500 for the appends and segments) issued back to back after 50 warm-up calls, the
GPU synchronized only around them (a call the GPU takes longer for than the host shows the GPU's
time once its queue fills). ``decode_kernel[grid](...)`` is one launch through Triton's
``JITFunction.run`` (binding and specializing its ~50 arguments, the kernel-cache lookup, the
launch); ``compiled[grid]`` and ``compiled.run`` launch the same compiled kernel without it;
``Launcher[grid]`` is how ``decode_triton`` launches it (qkv.kernels.triton.launch: its own key,
then the compiled kernel).

    PYTHONPATH=. python3 benchmarks/launch_cost.py
"""

from __future__ import annotations

import json
import time

import torch
from common import environment

import qkv
from qkv import kernels
from qkv.kernels.triton import decode


def per_call(fn, n: int = 2000) -> float:
    """Host microseconds of one call of ``fn``: the mean of ``n`` after 50 warm-up calls."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - start) / n
    torch.cuda.synchronize()
    return host * 1e6


def launch(q, segments) -> tuple:
    """The decode kernel's grid, arguments and compiled kernel as ``decode_triton`` launches it."""
    seen, real = {}, decode.decode_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.update(grid=grid, args=args, kwargs=kwargs, compiled=real.jit[grid](*args, **kwargs))
            return run

    decode.decode_kernel = Spy()
    try:
        decode.decode_triton(q, segments)
    finally:
        decode.decode_kernel = real
    return seen["grid"], seen["args"], seen["kwargs"], seen["compiled"]


def main() -> None:
    print(json.dumps(environment()), flush=True)  # what the numbers were measured on
    for policy, options in (("kivi", {}), ("qvg", {"span_tokens": 1024})):
        built = qkv.build_policy(policy, clusters=16) if policy == "qvg" else policy
        layer = qkv.KVCache(built, num_layers=1, **options).layer(0)
        g = torch.Generator(device="cuda").manual_seed(0)
        layer.append(*[torch.randn(1, 8, 2048, 128, device="cuda", generator=g).bfloat16() for _ in range(2)])
        token = torch.randn(1, 8, 1, 128, device="cuda", generator=g).bfloat16()
        q = torch.randn(1, 32, 1, 128, device="cuda", generator=g).bfloat16()
        segments = layer.attention_segments()
        kernels.attention(q, segments, method="decode")
        grid, args, kwargs, compiled = launch(q, segments)
        launcher = decode.decode_kernel
        real = launcher.jit
        bound = list(args) + [kwargs[p.name] for p in real.params[len(args):]]
        stream = torch.cuda.current_stream().cuda_stream
        rows = {
            "decode_triton (both launches + host)": per_call(lambda: decode.decode_triton(q, segments)),
            "kernels.attention(decode)": per_call(lambda: kernels.attention(q, segments, method="decode")),
            "decode_kernel[grid](...) jit run": per_call(lambda: real[grid](*args, **kwargs)),
            "Launcher[grid](...) (qkv's: the compiled kernel, keyed)": per_call(lambda: launcher[grid](*args, **kwargs)),
            "compiled[grid](*all args)": per_call(lambda: compiled[grid](*bound)),
            "compiled.run(...) C launcher only": per_call(lambda: compiled.run(
                grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *bound)),
            "layer.attention_segments()": per_call(layer.attention_segments, 500),
            "torch.empty(3)+fill": per_call(lambda: torch.empty(3, device="cuda").fill_(1)),
            "layer.append(1 token)": per_call(lambda: layer.append(token, token), 500),
        }
        print(policy, {name: round(us, 1) for name, us in rows.items()}, "nargs", len(bound), flush=True)


if __name__ == "__main__":
    main()
