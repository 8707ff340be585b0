"""How k-means ends, on real K/V: a last assignment pass (``finish=assign``, the default) or the
last iteration's means (``finish=update``, as the reference QVG and flash-kmeans end).

Relative MSE (sum |x - x_hat|^2 / sum |x|^2) of ``kmeans(iters=I,finish=F),centroid,int2(block=64)``
(256 clusters, random init as the presets, seed 0) for I in ``--iters``, on the first 2 layers of
``qkv.realdata``'s ``wan`` (first 8,192 tokens), ``minilm`` (6,144 tokens; D = 32, so blocks of 32)
and ``whisper-encoder`` (1,500 tokens; D = 64), the first 4 heads, K and V apart. Each cell also
names its assignment passes (I + 1 with ``assign``, I with ``update``), so the two can be compared at
equal iterations and at equal passes (an assignment pass is the larger part of an iteration's GPU
time: docs/kernels.md). Torch path on the CPU, about a minute with the data built.

    PYTHONPATH=. python3 benchmarks/kmeans_finish.py --out benchmarks/results/kmeans_finish.json
"""

from __future__ import annotations

import argparse
import statistics

from common import spec_relative_mse, write_json

from qkv.realdata import load_dataset

DATA = {"wan": 8192, "minilm": 6144, "whisper-encoder": 1500}  # dataset -> tokens used
LAYERS, HEADS = 2, 4
FINISHES = ("assign", "update")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kmeans_finish.json")
    parser.add_argument("--iters", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    args = parser.parse_args()
    rows = []
    for name, tokens in DATA.items():
        samples = load_dataset(name)[:LAYERS]
        for tensor in ("k", "v"):
            xs = [getattr(s, tensor)[:, :HEADS, :tokens].float().contiguous() for s in samples]
            block = min(64, xs[0].shape[-1])
            for iters in args.iters:
                for finish in FINISHES:
                    spec = f"kmeans(iters={iters},finish={finish}),centroid,int2(block={block})"
                    rows.append({"data": name, "tensor": tensor, "tokens": tokens, "iters": iters, "finish": finish,
                                 "assignment_passes": iters + (finish == "assign"),
                                 "rel_mse": statistics.mean(spec_relative_mse(spec, x) for x in xs)})
                    print(rows[-1], flush=True)
    write_json(args.out, {"layers": LAYERS, "heads": HEADS, "clusters": 256, "init": "random", "seed": 0,
                          "rows": rows})


if __name__ == "__main__":
    main()
