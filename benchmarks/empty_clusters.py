"""How often a Lloyd step of k-means has an empty cluster to re-seed, on real K/V and on the
clustered data of the GPU benchmarks.

Each step searches far tokens only for the rows (heads) with an empty cluster
(``kmeans_far(..., counts=)``, docs/kernels.md): this counts those rows at every step of
``kmeans(x, 256, --iters, init="random")`` (the presets' start), seeds 0-2, on the first 2 layers
of ``qkv.realdata``'s ``wan`` (8,192 tokens), ``minilm`` (6,144) and ``whisper-encoder`` (1,500), every
head, K and V apart, and on ``bench_kernels.py``'s clustered LongCat-Video span [1, 32, 29640, 128].
Torch path on the CPU, a few minutes.

    PYTHONPATH=. python3 benchmarks/empty_clusters.py --out benchmarks/results/empty_clusters.json
"""

from __future__ import annotations

import argparse

import torch
from common import clustered, overridden, write_json

from qkv import kernels
from qkv.grouping.kmeans import kmeans
from qkv.realdata import load_dataset

DATA = {"wan": 8192, "minilm": 6144, "whisper-encoder": 1500}  # dataset -> tokens used
LAYERS = 2
CLUSTERS = 256
SEEDS = (0, 1, 2)


def rows_with_empty(x: torch.Tensor, iters: int, seed: int) -> list[int]:
    """Rows of ``x`` [N, S, D] with an empty cluster at each Lloyd step of k-means."""
    steps = []
    far = kernels.kmeans_far

    def counted(dist, k, per_pick, *, counts=None, backend="auto"):
        steps.append(int((counts == 0).any(-1).sum()))
        return far(dist, k, per_pick, counts=counts, backend=backend)

    with overridden(kernels, {"kmeans_far": counted}):
        kmeans(x, CLUSTERS, iters, init="random", seed=seed, backend="torch", objective=False)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/empty_clusters.json")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    cases = {"clustered longcat": clustered((1, 32, 29640, 128), device="cpu").flatten(0, 1)}
    for name, tokens in DATA.items():
        for layer, sample in enumerate(load_dataset(name)[:LAYERS]):
            for tensor in ("k", "v"):
                cases[f"{name} layer {layer} {tensor}"] = getattr(sample, tensor)[:, :, :tokens].flatten(0, 1).float()
    rows = []
    for case, x in cases.items():
        for seed in SEEDS:
            rows.append({"case": case, "rows": x.shape[0], "tokens": x.shape[1], "seed": seed,
                         "rows_with_an_empty_cluster_by_step": rows_with_empty(x, args.iters, seed)})
            print(rows[-1], flush=True)
    write_json(args.out, {"clusters": CLUSTERS, "iters": args.iters, "init": "random", "rows": rows})


if __name__ == "__main__":
    main()
