"""Host time of an eager encode: what the CPU spends queueing one ``compress`` call on a GPU.

An encode's kernels run after the host has queued them; where queueing takes longer than the GPU
takes to run them, a call costs its host time. This times ``--calls`` eager calls of a K encode
(``qvg`` at ``--iters`` k-means iterations, clustered data of LongCat-Video's span
[1, 32, 29640, 128], no value check: as a streaming cache compresses a span) twice: the host's
time per call until the last is queued, and the wall time per call until the GPU is done. With
``--profile``, also the functions the host spends the most time in (cProfile, by own time; file
names without their folders).

    python benchmarks/encode_host.py --out benchmarks/results/encode_host_h100.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from common import clustered, write_json

import qkv

SHAPE = (1, 32, 29640, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("encode_host times calls on a GPU: no CUDA device here")
    x = clustered(SHAPE)
    compressor = qkv.build_policy("qvg", iters=args.iters).k

    def call():
        return compressor.compress(x, validate=False)

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    queued = (time.perf_counter() - start) / args.calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.calls
    results = {"shape": list(SHAPE), "policy": "qvg", "iters": args.iters, "calls": args.calls,
               "host_ms_a_call": queued * 1e3, "wall_ms_a_call": wall * 1e3}
    print(f"host {queued * 1e3:.3f} ms a call, wall {wall * 1e3:.3f} ms a call")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            call()
        profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(25)
        results["profile_by_own_time"] = text.getvalue()
        print(text.getvalue())
    write_json(args.out, results)


if __name__ == "__main__":
    main()
