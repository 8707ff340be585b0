"""A qvg encode (2 k-means iterations) of a clustered LongCat-Video span [1, 32, 29640, 128] bf16,
for a hardware-counter profiler.

Compresses the span ``--calls`` times (the first compiles the kernels); run it under Nsight Compute
to read where a kernel's time goes (pipe use, issue rate, stall reasons), e.g. the assignment's
third launch (the second encode's first):

    ncu --clock-control none --kernel-name regex:_assign_kernel --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --print-details all \\
        python3 benchmarks/profile_encode.py
"""

from __future__ import annotations

import argparse

import torch
from common import clustered

import qkv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    x = clustered((1, 32, 29640, 128))
    policy = qkv.build_policy("qvg", iters=2).k
    for _ in range(args.calls):
        policy.compress(x)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
