"""What the weighted D^2 sampling kernel's loops cost, compiled for a GPU without one.

Compiles ``_kmeanspp_kernel`` (kernels/triton/kmeans/seeding.py) for an sm_90 target with the installed
Triton at the seedings' shapes (k-means||'s reduction: 1,024 candidates, rounds of 8 picks, its
distances as products on the tensor cores; k-means++: 4,096 subsample tokens, a pick a round;
head dim 128; ``--points`` in bf16 or fp32) under each ``--values`` (the
:class:`~qkv.kernels.triton.tiles.SeedTile` values a load) and ``--warps``, disassembles it with
the ``nvdisasm`` that ships with Triton, and reports the registers a thread, its stack frame and,
per loop (largest first), its instructions, barriers and warp shuffles: a round's distance pass
is the loop that runs most often.

    PYTHONPATH=.:benchmarks python3 benchmarks/kmeanspp_sass.py --out benchmarks/results/kmeanspp_sass_products_triton36.json

Run against an older tree (its qkv first on PYTHONPATH) it compiles that tree's kernel the same
way: ``kmeanspp_sass_before_products_triton36.json`` is 057a8bb's, ``--points fp32`` (what its
seedings passed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import tempfile

import triton
from decode_sass import disassemble, loop_bodies, resources

from qkv.grouping.kmeans import REDUCE_ROUNDS
from qkv.kernels.kmeans import round_sizes
from qkv.kernels.triton.kmeans.seeding import _kmeanspp_kernel, kmeanspp_launch
from qkv.kernels.triton.tiles import SeedTile

SHAPES = {"kmeans||": (1024, 256, 1 + REDUCE_ROUNDS), "kmeans++": (4096, 256, 256)}  # points, picks, rounds


def compiled(constants: dict, warps: int, stages: int, points: str) -> tuple[str, dict]:
    """(SASS, registers and stack bytes) of the kernel for sm_90 on ``points`` ("*bf16", "*fp32"),
    its pointers, K and D specialized as multiples of 16 (as the JIT does at the seedings' shapes),
    pipelined in ``stages`` as launched."""
    pointers = {a: "*i64" if a == "out_ptr" else points if a in ("p_ptr", "pt_ptr") else "*fp32"
                for a in _kmeanspp_kernel.arg_names if a.endswith("_ptr")}
    with tempfile.TemporaryDirectory() as tmp:
        sass = disassemble(_kmeanspp_kernel, constants, pointers, warps, None, tmp, stages=stages,
                           divisible=(*pointers, "K", "D"))
        usage = resources(pathlib.Path(tmp) / f"{_kmeanspp_kernel.__name__}.cubin")
    return sass, usage


def loops(sass: str) -> list[dict]:
    """Every loop (a backward branch's body), largest first: instructions, barriers, shuffles."""
    return sorted(({"instructions": len(body), "barriers": sum(o.startswith("BAR") for o in body),
                    "shuffles": sum(o.startswith("SHFL") for o in body)} for body in loop_bodies(sass)[0]),
                  key=lambda row: -row["instructions"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--warps", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--points", choices=["bf16", "fp32"], default="bf16",
                        help="the points' dtype (the seedings pass a span's own: bf16 for bf16 tokens)")
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    rows = []
    for values, tile_warps in itertools.product(args.values, args.warps):
        for name, (points, picks, rounds) in SHAPES.items():
            constants = kmeanspp_launch(points, 128, max(round_sizes(picks, rounds)), SeedTile(values, tile_warps),
                                        2 if args.points == "bf16" else 4)
            warps, stages = constants.pop("num_warps"), constants.pop("num_stages", 3)
            if "EMULATE" in _kmeanspp_kernel.arg_names:  # (a kernel before it had none: compare with one)
                constants["EMULATE"] = False
            sass, usage = compiled(constants, warps, stages, f"*{args.points}")
            rows.append({"seeding": name, "points": args.points, "values": values, "warps": warps, "stages": stages,
                         **constants,
                         **usage, "loops": loops(sass)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": rows},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
