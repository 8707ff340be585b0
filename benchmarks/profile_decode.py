"""The decode kernel at one of ``bench_decode.py``'s cases, for a hardware-counter profiler.

Builds the case's history for each policy, calls the decode kernel ``--calls`` times and prints
the compiled kernel's registers, spills and shared memory per launch variant; run it under Nsight
Compute to read where the kernel's time goes (stall reasons, issue rate, occupancy), e.g.

    ncu --clock-control none --kernel-name regex:decode_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python3 benchmarks/profile_decode.py --case 2 --policies rtn qvg bf16

``--attend``: instead, the GPU time of every kernel a ``KVCache.attend`` call launches (the query
rotation, the decode kernel, the merge), from ``torch.profiler`` over ``--calls`` calls after 20
warm-up calls, per policy:

    PYTHONPATH=benchmarks:. python3 benchmarks/profile_decode.py --attend --case 0 --policies quarot rtn --calls 50
"""

from __future__ import annotations

import argparse

import torch
from bench_decode import HEAD_DIM, HEADS, build, history
from tune_tiles import CASES, planned

from qkv.kernels.triton.decode import decode_triton
from qkv.kernels.triton.decode_kernel import decode_kernel


def compiled_variants() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of the decode kernel."""
    out = []
    for caches in decode_kernel.device_caches.values():
        for kernel in caches[0].values():
            out.append({"registers": kernel.n_regs, "spills": kernel.n_spills,
                        "shared": kernel.metadata.shared, "warps": kernel.metadata.num_warps})
    return out


def attend_kernels(cache, q: torch.Tensor, calls: int, label: str) -> None:
    """Print the GPU time of each kernel of ``calls`` calls of ``cache.attend(0, q)``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):
        cache.attend(0, q)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            cache.attend(0, q)
        torch.cuda.synchronize()
    print(label)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=40), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=int, default=2, help="index into tune_tiles.CASES")
    parser.add_argument("--policies", nargs="+", default=["rtn", "qvg", "bf16"])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--attend", action="store_true", help="GPU time per kernel of KVCache.attend (torch.profiler)")
    args = parser.parse_args()
    batch, tokens, sq = CASES[args.case]
    k, v = history(batch, tokens)
    q = (torch.randn(batch, HEADS, sq, HEAD_DIM, device="cuda") * 0.5).bfloat16()
    if args.attend:
        for policy in args.policies:
            attend_kernels(build(policy, k, v), q, args.calls, policy)
        return
    for policy in args.policies:
        segments = planned(build(policy, k, v).layer(0).segments())
        for _ in range(args.calls):
            decode_triton(q, segments)
        torch.cuda.synchronize()
        print(policy, compiled_variants(), flush=True)


if __name__ == "__main__":
    main()
