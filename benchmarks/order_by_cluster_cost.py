"""GPU time of ordering a span's tokens by cluster (the sorted k-means update's first step).

Times ``qkv.kernels.triton.kmeans.update.order_by_cluster`` on random assignments at the spans' shapes
(LongCat [32, 29640], Self-Forcing [12, 37440], a Self-Forcing chunk [12, 4680]; 256 clusters,
and 1,024 at LongCat): wall time of a call and its GPU time (replayed from a CUDA graph), as
``radix_sort``. With ``--other TREE`` it also loads that tree's module
(``TREE/qkv/kernels/triton/kmeans/update.py``, or ``kmeans.py`` in a tree from before the
k-means kernels were split into modules; e.g. a ``git worktree`` of another commit), checks that
both give the same keys, order and bounds, and times it under ``--other-name``: two
implementations on the same tensors in one process. From a tree of commit 99673f9 (torch's sort
and a binary search), with 082de69's counting sort in ``../counting``:

    PYTHONPATH=.:benchmarks python3 benchmarks/order_by_cluster_cost.py --other ../counting \\
        --other-name counting_sort --out benchmarks/results/order_by_cluster_counting_082de69_h100.json

(The committed file came from the same comparison run the other way round, 082de69's tree
loading the earlier module, before this script took its final form: the same rows, its
environment only the GPU and torch.)
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import torch
from common import gpu_ms, ms, write_json

from qkv.kernels.triton.kmeans import update

SHAPES = [(32, 29640, 256), (12, 37440, 256), (12, 4680, 256), (32, 29640, 1024)]  # rows, tokens, clusters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", help="another tree whose order_by_cluster to time against this one's")
    parser.add_argument("--other-name", default="other", help="the other tree's name in the rows")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    impls = {"radix_sort": update}
    if args.other:
        path = pathlib.Path(args.other) / "qkv" / "kernels" / "triton" / "kmeans" / "update.py"
        if not path.exists():  # a tree from before the k-means kernels were split into modules
            path = path.parent.with_suffix(".py")
        spec = importlib.util.spec_from_file_location("other_kmeans", path)
        impls[args.other_name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(impls[args.other_name])
    rows = []
    for n, s, c in SHAPES:
        a = torch.randint(0, c, (n, s), device="cuda")
        results = [module.order_by_cluster(a, c) for module in impls.values()]
        row = {"n": n, "s": s, "c": c,
               "same": all(torch.equal(x, y) for other in results[1:] for x, y in zip(results[0], other))}
        for name, module in impls.items():
            row[f"{name}_ms"] = ms(lambda: module.order_by_cluster(a, c))  # noqa: B023 - timed at once
            row[f"{name}_gpu_ms"] = gpu_ms(lambda: module.order_by_cluster(a, c))  # noqa: B023
        rows.append(row)
        print(row, flush=True)
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
