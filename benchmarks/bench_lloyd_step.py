"""A k-means (Lloyd) iteration on a GPU with the clusters' sums gathered by the assignment pass
(``kmeans_assign(..., sums=True)``: one read of the tokens) against the assignment and the
one-hot update as two passes, side by side on the same tensors; and whole ``kmeans`` calls (5
iterations from random tokens, as the qvg presets run) both ways (``FUSED_MAX_CLUSTERS`` set to 0,
then to the kernel's 64, whatever the dispatch's limit).

Shapes (rows, tokens, head dim): a SANA-WM compression pass (8 blocks x 2 x 32 heads of 2,640
tokens), a Self-Forcing chunk (2 x 12 heads x 4,680 tokens), an AnyFlow-FAR coarse chunk (2 x 12
heads x 1,170 tokens), LongCat-Video's condition span (32 heads x 29,640); at 16, 32 and 64
clusters (the kernel holds up to 64).

    PYTHONPATH=. python3 benchmarks/bench_lloyd_step.py --out benchmarks/results/bench_lloyd_step_h200.json
"""

from __future__ import annotations

import torch

from bench_kmeans_update import timed
from common import gpu_main_args, overridden, write_json

from qkv import kernels
from qkv.grouping.kmeans import kmeans
from qkv.kernels.triton.kmeans import assign as tk

SHAPES = {"sana_wm_pass": (512, 2640, 128), "self_forcing_chunk": (24, 4680, 128),
          "anyflow_far_coarse": (24, 1170, 128), "longcat_video": (32, 29640, 128)}
CLUSTERS = (16, 32, 64)


def step(x, cent, fused: bool):
    """One iteration's assignment and update, without the loop's bookkeeping."""
    if fused:
        idx, _, sums = kernels.kmeans_assign(x, cent, sums=True)
        return kernels.kmeans_update(x, idx, cent, sums=sums)
    idx, _ = kernels.kmeans_assign(x, cent)
    return kernels.kmeans_update(x, idx, cent)


def main() -> None:
    args = gpu_main_args(__doc__, "bench_lloyd_step")
    rows = []
    for name, (n, s, d) in SHAPES.items():
        x = torch.randn(n, s, d, device="cuda", dtype=torch.bfloat16)
        for c in CLUSTERS:
            cent = x[:, torch.randperm(s, device="cuda")[:c]].float()
            with overridden(tk, {"FUSED_MAX_CLUSTERS": 64}):  # the kernel's most, whatever the dispatch's limit
                fused, counts = step(x, cent, True)
                split, split_counts = step(x, cent, False)
                row = {"shape": name, "rows": n, "tokens": s, "head_dim": d, "clusters": c,
                       "step_two_passes_ms": timed(lambda: step(x, cent, False)),
                       "step_one_pass_ms": timed(lambda: step(x, cent, True)),
                       # each pass with the device's tile of its kernel: the sums' fp32 order may differ
                       "means_max_rel_diff": float((fused - split).abs().max() / split.abs().max()),
                       "same_counts": bool(torch.equal(counts, split_counts))}
            results = {}
            for label, limit in (("two_passes", 0), ("one_pass", 64)):
                with overridden(tk, {"FUSED_MAX_CLUSTERS": limit}):
                    results[label] = kmeans(x, c, 5, init="random")
                    row[f"kmeans_5_iters_{label}_ms"] = timed(lambda: kmeans(x, c, 5, init="random"), reps=10)
            one, two = results["one_pass"].centroids, results["two_passes"].centroids
            row["kmeans_centroids_max_rel_diff"] = float((one - two).abs().max() / two.abs().max())
            print(row, flush=True)
            rows.append(row)
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
