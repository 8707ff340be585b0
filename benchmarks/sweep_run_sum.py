"""The sorted k-means update's run-sum launch on a GPU: ``_run_sum_kernel`` alone over runs of
128-512 sorted tokens, 32-128 tokens a product, 4 or 8 warps, with and without software
pipelining, on the assignments of 2 Lloyd iterations (256 clusters) of a LongCat-Video span
[1, 32, 29640, 128] and a Self-Forcing span [1, 12, 37440, 128], clustered and (``--real``)
real keys tiled to the shape; the whole ``update_sorted`` and its ordering (``order_by_cluster``) for scale. Reads the
tokens once: the bytes over the time are its rate.

    PYTHONPATH=benchmarks:. python3 benchmarks/sweep_run_sum.py --out benchmarks/results/sweep_run_sum_h100.json \
        --real whisper_k.safetensors   # bench_kernels.py --write-real makes this file
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from bench_kernels import real_tiled
from common import clustered, gpu_ms, write_json

from qkv.grouping.kmeans import kmeans
from qkv.kernels.triton.kmeans import update as tk

SHAPES = {"longcat_video": (1, 32, 29640, 128), "self_forcing": (1, 12, 37440, 128)}
CLUSTERS = 256
CHOICES = {"run": (128, 256, 512), "step": (32, 64, 128), "warps": (4, 8), "stages": (1, 2)}


def sweep(x: torch.Tensor) -> tuple[dict, list[dict]]:
    """(sizes and whole-update times, one row per launch) for tokens x [N, S, D]."""
    fit = kmeans(x, CLUSTERS, 2, init="random")
    n, s, d = x.shape
    keys, order, bounds = tk.order_by_cluster(fit.assignments, CLUSTERS)
    sizes = (bounds[:, 1:] - bounds[:, :-1]).float()
    info = {"tokens_bytes": x.numel() * x.element_size(), "cluster_mean": sizes.mean().item(),
            "cluster_max": sizes.max().item(), "cluster_p99": sizes.quantile(0.99).item(),
            "order_ms": gpu_ms(lambda: tk.order_by_cluster(fit.assignments, CLUSTERS)),
            "update_sorted_ms": gpu_ms(lambda: tk.update_sorted(x, fit.assignments, fit.centroids))}
    rows = []
    for run, step, warps, stages in itertools.product(*CHOICES.values()):
        if step > run:
            continue
        runs = triton.cdiv(s, run)
        sums = torch.empty(n, CLUSTERS, d, dtype=torch.float32, device=x.device)
        edges = torch.empty(n, runs, 2, d, dtype=torch.float32, device=x.device)

        def launch():
            tk._run_sum_kernel[(n, runs)](
                x, x, keys, order, bounds, sums, edges, s, CLUSTERS, d, x.stride(0), x.stride(1), runs, PARTS=1,
                HAS_SCALE=False, EMULATE=False, RUN=run, BLOCK_T=step, BLOCK_J=tk.RUN_CLUSTERS,
                BLOCK_D=triton.next_power_of_2(d), num_warps=warps, num_stages=stages)

        t = gpu_ms(launch, rep=40)
        rows.append({"run": run, "step": step, "warps": warps, "stages": stages, "ms": t,
                     "tb_per_s": info["tokens_bytes"] / (t * 1e-3) / 1e12})
    return info, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--real", help="safetensors with real k [H, S, D] bf16")
    args = parser.parse_args()
    results = []
    for name, shape in SHAPES.items():
        for data in ("clustered", "real") if args.real else ("clustered",):
            x = (real_tiled(shape, args.real) if data == "real" else clustered(shape)).flatten(0, 1)
            info, rows = sweep(x)
            best = min(rows, key=lambda r: r["ms"])
            print(name, data, info, "best", best, flush=True)
            results.append({"shape": name, "data": data, **info, "launches": rows})
            del x
            torch.cuda.empty_cache()
    write_json(args.out, {"what": "_run_sum_kernel launches (see the script's docstring)", "cases": results})


if __name__ == "__main__":
    main()
