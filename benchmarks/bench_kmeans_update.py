"""The k-means update on a GPU: the one-hot tensor-core sums (``update_onehot``) against the
sorted per-cluster sums (``update_sorted``), side by side on the same tensors; ``update_triton``
takes the one-hot sums up to ``ONEHOT_MAX_CLUSTERS`` clusters and the sorted ones beyond.

Shapes: a SANA-WM compression pass (8 blocks x 2 x 32 heads, 2,640-token spans, 64 clusters),
LongCat-Video's condition span (32 heads x 29,640 tokens, 256 clusters) and the Self-Forcing
span (12 heads x 37,440 tokens: 8 chunks of 4,680, at 128 and 256 clusters); balanced random
assignments, and half the tokens in one cluster (what a warm start can do). Checks each against
the torch reference (max error), counts, and run-to-run equality.

    PYTHONPATH=. python3 benchmarks/bench_kmeans_update.py --out benchmarks/results/bench_kmeans_update_h200.json
"""

from __future__ import annotations

import torch

from common import gpu_main_args, write_json

from qkv import kernels
from qkv.kernels.triton.kmeans import update as tk
from qkv.kernels.triton.kmeans.sums import update_onehot

SHAPES = {"sana_wm_pass": (512, 2640, 128, 64), "longcat_video": (32, 29640, 128, 256),
          "self_forcing": (12, 37440, 128, 256), "self_forcing_128": (12, 37440, 128, 128)}


def timed(fn, reps: int = 20) -> float:
    """Mean GPU ms per call of ``fn`` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    args = gpu_main_args(__doc__, "bench_kmeans_update")
    rows = []
    for name, (n, s, d, c) in SHAPES.items():
        x = torch.randn(n, s, d, device="cuda", dtype=torch.bfloat16)
        for skew in (False, True):
            assign = torch.randint(0, c, (n, s), device="cuda")
            if skew:
                assign[:, : s // 2] = 0
            old = torch.randn(n, c, d, device="cuda")
            ref, ref_counts = kernels.kmeans_update(x, assign, old, backend="torch")
            onehot, counts = update_onehot(x, assign, old)
            again, _ = update_onehot(x, assign, old)
            ordered, ordered_counts = tk.update_sorted(x, assign, old)
            row = {"shape": name, "rows": n, "tokens": s, "head_dim": d, "clusters": c, "half_in_one_cluster": skew,
                   "onehot_ms": timed(lambda: update_onehot(x, assign, old)),
                   "sorted_ms": timed(lambda: tk.update_sorted(x, assign, old)),
                   "chosen": "onehot" if c <= tk.ONEHOT_MAX_CLUSTERS else "sorted",
                   "onehot_max_err": float((onehot - ref).abs().max()),
                   "sorted_max_err": float((ordered - ref).abs().max()),
                   "counts_equal": bool(torch.equal(counts, ref_counts) and torch.equal(ordered_counts, ref_counts)),
                   "deterministic": bool(torch.equal(onehot, again))}
            print(row, flush=True)
            rows.append(row)
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
