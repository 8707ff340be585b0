"""GPU time of each launch of quantize+pack on a LongCat-Video span, by settling tiles a program.

With a row multiplier (the presets' fp8 scales) ``quantize_pack_triton`` makes two launches: a
speculative pass that quantizes every tile and a settling pass that stores the scales relative to
the row's multiplier (docs/kernels.md, "Quantize+pack without its block-peak pass"). This times
each launch on its own (the CUDA kernels' times from the torch profiler, in launch order, the
median over ``--reps`` calls) for the keys of ``qvg`` (the residual after its centroids) and
``rtn`` and the values of ``kivi`` (asym, fp16 scales), at ``QuantizeTile.settle_tiles`` in ``--settle`` (the table's values and warps
otherwise), on clustered data of LongCat's span [1, 32, 29640, 128].

    python benchmarks/quantize_passes.py --out benchmarks/results/quantize_passes_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

import qkv
from common import clustered, write_json
from qkv.kernels.triton.quantize import quantize_pack_triton
from qkv.kernels.triton.tiles import tile_for

SHAPE = (1, 32, 29640, 128)


def launches_us(fn, reps: int) -> list[float]:
    """Median GPU time in microseconds of each CUDA kernel one call of ``fn`` launches, in order."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    per_call = len(kernels) // reps
    if per_call * reps != len(kernels):
        raise RuntimeError(f"{len(kernels)} kernels over {reps} calls: not the same launches every call")
    return [statistics.median(kernels[r * per_call + k].device_time for r in range(reps)) for k in range(per_call)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--settle", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("quantize_passes times kernels on a GPU: no CUDA device here")
    x = clustered(SHAPE)
    rows = x.flatten(0, 1)
    table = tile_for("quantize", x.device, 0)
    results = []
    for policy, side in (("qvg", "k"), ("rtn", "k"), ("kivi", "v")):
        ct = getattr(qkv.build_policy(policy), side).compress(x)
        added = [i for i, stage in enumerate(ct.stages) if stage.centroids is not None]
        centroids = [ct.stages[i].centroids.flatten(0, 1) for i in added]
        assignments = [ct.stage_assignments(i) for i in added]
        for settle in args.settle:
            tile = dataclasses.replace(table, settle_tiles=settle)
            times = launches_us(lambda: quantize_pack_triton(rows, ct.format.codes, centroids, assignments, tile=tile),
                                args.reps)
            results.append({"policy": policy, "tensor": side, "format": str(ct.format.codes), "settle_tiles": settle,
                            "launches_us": times, "total_us": sum(times)})
            print(f"{policy:5s} {side} settle {settle:3d}: " + " + ".join(f"{t:.1f}" for t in times) + " us")
    write_json(args.out, {"shape": list(SHAPE), "tile": dataclasses.asdict(table), "passes": results})


if __name__ == "__main__":
    main()
