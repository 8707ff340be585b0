"""k-means|| seeding time per span against the rounds its candidates are reduced in, on the GPU.

``qkv.grouping.kmeans`` draws the C centroids from k-means||'s 4 C weighted candidates in
``1 + REDUCE_ROUNDS`` rounds of weighted D^2 sampling (one kernel); fewer rounds are fewer passes
over the candidates. For each R of ``--rounds`` this times ``kmeans||`` on bench_kernels'
clustered LongCat-Video span [1, 32, 29640, 128] bf16 (256 clusters, every head in one call; wall
time of a call, median) and gives the k-means objective after 5 Lloyd iterations over sum |x|^2,
then times the oversampling rounds alone (the reduction replaced by taking the first C
candidates). ``--oversample RxL ...`` also times the oversampling shapes given (R rounds of L x C
candidates; the default reduction). The quality on real K/V per R: ``seeding_quality.py
--reduce-rounds``, per shape ``--oversample``.

    PYTHONPATH=. python3 benchmarks/seeding_rounds.py --out benchmarks/results/seeding_reduce_rounds_h200.json
"""

from __future__ import annotations

import argparse
import importlib

import torch
from common import clustered, ms, oversampling, overridden, write_json

KMEANS = importlib.import_module("qkv.grouping.kmeans")  # the module, not the function qkv.grouping exports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, nargs="*", default=[32, 16, 8])
    parser.add_argument("--oversample", nargs="*", type=oversampling, default=[], metavar="RxL",
                        help="oversampling shapes to time with the default reduction: R rounds of L x C candidates")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    x = clustered((1, 32, 29640, 128), device="cuda").flatten(0, 1)
    energy = x.float().square().sum().item()
    default = f"{KMEANS.PARALLEL_ROUNDS}x{KMEANS.PARALLEL_OVERSAMPLE}"
    cases = ([({"REDUCE_ROUNDS": r}, {"reduce_rounds": r, "oversample": default}) for r in args.rounds]
             + [({"PARALLEL_ROUNDS": r, "PARALLEL_OVERSAMPLE": m},
                 {"reduce_rounds": KMEANS.REDUCE_ROUNDS, "oversample": f"{r}x{m}"}) for r, m in args.oversample]
             # the oversampling alone: the first C candidates, no reduction
             + [({"_reduce": lambda pool, weights, clusters, r, gen, backend: pool[:, :clusters]},
                 {"reduce_rounds": "oversampling only", "oversample": default})])
    rows = []
    for overrides, row in cases:
        with overridden(KMEANS, overrides):
            gen = torch.Generator(device="cuda").manual_seed(0)
            row = {"shape": "longcat", **row, "seed_ms": ms(lambda: KMEANS._init_parallel(x, 256, gen, "auto"),
                                                            warmup=5, rep=50)}
            if "_reduce" not in overrides:
                result = KMEANS.kmeans(x, 256, 5, init="kmeans||", seed=0)
                row["rel_objective"] = result.objective[-1].sum().item() / energy
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
