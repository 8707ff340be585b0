"""Reconstruction error of k-means smoothing per seeding, on real K/V.

Relative MSE (sum |x - x_hat|^2 / sum |x|^2) of ``kmeans(init=..., seed=s),centroid,int2(block=64)``
(256 clusters, 5 Lloyd iterations, the kmeans defaults) for each seeding (random, kmeans++,
kmeans||), on the first 2 layers of ``qkv.realdata``'s ``wan`` (a Wan2.1-1.3B-shaped DiT with
random weights over real video frames; the first 8,192 tokens) and ``minilm`` (all 6,144 tokens;
D = 32, so the block becomes 32), the first 4 heads, K and V apart, averaged over seeds 0 and 1.
Torch path on the CPU (a few minutes with the data built). ``--reduce-rounds R ...`` adds a
column ``kmeans||@R`` per R: k-means|| with its candidates reduced in R rounds after the first
pick instead of ``qkv.grouping.kmeans.REDUCE_ROUNDS`` (C - 1: one pick a round, weighted
k-means++); ``--oversample RxL ...`` a column ``kmeans||@RxL`` per shape of the oversampling: R
rounds of L x C candidates each instead of ``PARALLEL_ROUNDS`` x ``PARALLEL_OVERSAMPLE``;
``--reduce-lloyd I ...`` a column ``kmeans||@lloydI`` per I: the candidates reduced instead by a
weighted draw of C of them (by weight) and I weighted Lloyd iterations over the candidates (what
a reduction without D^2 sampling's sequential rounds would give); ``--seeds`` the k-means seeds to
average over.

    PYTHONPATH=. python3 benchmarks/seeding_quality.py   # writes benchmarks/results/seeding_quality.json
    PYTHONPATH=. python3 benchmarks/seeding_quality.py --inits kmeans|| --reduce-rounds 8 32 255 \
        --seeds 0 1 2 3 4 5 --out benchmarks/results/seeding_quality_reduce_rounds.json
    PYTHONPATH=. python3 benchmarks/seeding_quality.py --inits kmeans|| --oversample 4x1 --seeds 0 1 2 3 4 5 \
        --out benchmarks/results/seeding_quality_oversample.json
    PYTHONPATH=. python3 benchmarks/seeding_quality.py --inits random kmeans|| --reduce-lloyd 0 2 4 --seeds 0 1 2 \
        --out benchmarks/results/seeding_quality_reduce_lloyd.json
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics

import torch

from common import oversampling, overridden, spec_relative_mse, write_json

from qkv import kernels
from qkv.realdata import load_dataset

KMEANS = importlib.import_module("qkv.grouping.kmeans")

INITS = ("random", "kmeans++", "kmeans||")
DATA = {"wan": 8192, "minilm": 6144}  # dataset -> tokens used
LAYERS, HEADS, SEEDS = 2, 4, (0, 1)


def lloyd_reduce(pool, weights, clusters, rounds, gen, backend, iters):
    """k-means||'s reduction replaced: C candidates drawn by weight, then ``iters`` Lloyd
    iterations over the weighted candidates (a cluster left empty keeps its centroid)."""
    n, _, d = pool.shape
    points = pool.float()
    centroids = KMEANS._gather_rows(points, KMEANS._weighted_draw(weights, clusters, gen))
    for _ in range(iters):
        nearest, _ = kernels.kmeans_assign(points, centroids, backend=backend)
        sums = torch.zeros(n, clusters, d, device=pool.device)
        sums.scatter_add_(1, nearest[..., None].expand(-1, -1, d), points * weights[..., None])
        mass = torch.zeros(n, clusters, device=pool.device).scatter_add_(1, nearest, weights)[..., None]
        centroids = torch.where(mass > 0, sums / mass.clamp_min(torch.finfo(torch.float32).tiny), centroids)
    return centroids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/seeding_quality.json")
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--reduce-rounds", nargs="*", type=int, default=[])
    parser.add_argument("--oversample", nargs="*", type=oversampling, default=[], metavar="RxL")
    parser.add_argument("--reduce-lloyd", nargs="*", type=int, default=[], metavar="I")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    args = parser.parse_args()
    columns = ([(init, init, {}) for init in args.inits]
               + [(f"kmeans||@{r}", "kmeans||", {"REDUCE_ROUNDS": r}) for r in args.reduce_rounds]
               + [(f"kmeans||@{r}x{m}", "kmeans||", {"PARALLEL_ROUNDS": r, "PARALLEL_OVERSAMPLE": m})
                  for r, m in args.oversample]
               + [(f"kmeans||@lloyd{i}", "kmeans||", {"_reduce": functools.partial(lloyd_reduce, iters=i)})
                  for i in args.reduce_lloyd])
    rows = []
    for name, tokens in DATA.items():
        samples = load_dataset(name)[:LAYERS]
        for tensor in ("k", "v"):
            xs = [getattr(s, tensor)[:, :HEADS, :tokens].float().contiguous() for s in samples]
            row = {"data": name, "tensor": tensor, "tokens": tokens}
            for column, init, overrides in columns:
                with overridden(KMEANS, overrides):
                    row[column] = statistics.mean(
                        spec_relative_mse(f"kmeans(init={init},seed={seed}),centroid,int2(block=64)", x)
                        for x in xs for seed in args.seeds)
            rows.append(row)
            print(" ".join(f"{k}={v:.5f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    write_json(args.out, {"layers": LAYERS, "heads": HEADS, "seeds": args.seeds,
                          "reduce_rounds_default": KMEANS.REDUCE_ROUNDS,
                          "oversample_default": f"{KMEANS.PARALLEL_ROUNDS}x{KMEANS.PARALLEL_OVERSAMPLE}", "rows": rows})


if __name__ == "__main__":
    main()
