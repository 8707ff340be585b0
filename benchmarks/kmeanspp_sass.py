"""What the weighted D^2 sampling kernel's loops cost, compiled for a GPU without one.

Compiles ``_kmeanspp_kernel`` (kernels/triton/kmeans.py) for an sm_90 target with the installed
Triton at the seedings' shapes (k-means||'s reduction: 1,024 candidates, rounds of 8 picks;
k-means++: 4,096 subsample tokens, a pick a round; head dim 128) under each ``--values`` (the
:class:`~qkv.kernels.triton.tiles.SeedTile` values a load: the H100 table's 16,384, the H200's
4,096, the default 8,192) at ``--warps`` (16, as both tables' tiles), disassembles it with the
``nvdisasm`` that ships with Triton, and reports the registers a thread, its stack frame and, per
loop (largest first), its instructions, barriers and warp shuffles: a round's distance pass is
the loop that runs most often.

    PYTHONPATH=. python3 benchmarks/kmeanspp_sass.py --out benchmarks/results/kmeanspp_sass_triton36.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import tempfile

import triton
from decode_sass import loop_bodies, resources, tool
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qkv.grouping.kmeans import REDUCE_ROUNDS
from qkv.kernels.kmeans import round_sizes
from qkv.kernels.triton.kmeans import _kmeanspp_kernel, kmeanspp_launch
from qkv.kernels.triton.tiles import SeedTile

SHAPES = {"kmeans||": (1024, 256, 1 + REDUCE_ROUNDS), "kmeans++": (4096, 256, 256)}  # points, picks, rounds


def compiled(constants: dict, warps: int) -> tuple[str, str]:
    """(SASS, registers and stack bytes) of the kernel for sm_90."""
    signature = {a: "constexpr" if a in constants else "*i64" if a == "out_ptr" else "*fp32" if a.endswith("_ptr")
                 else "i32" for a in _kmeanspp_kernel.arg_names}
    kernel = triton.compile(ASTSource(_kmeanspp_kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = resources(cubin)
        sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return sass, usage


def loops(sass: str) -> list[dict]:
    """Every loop (a backward branch's body), largest first: instructions, barriers, shuffles."""
    return sorted(({"instructions": len(body), "barriers": sum(o.startswith("BAR") for o in body),
                    "shuffles": sum(o.startswith("SHFL") for o in body)} for body in loop_bodies(sass)[0]),
                  key=lambda row: -row["instructions"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, nargs="+", default=[16384, 8192, 4096])
    parser.add_argument("--warps", type=int, default=16)
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    rows = []
    for values in args.values:
        for name, (points, picks, rounds) in SHAPES.items():
            constants = kmeanspp_launch(points, 128, max(round_sizes(picks, rounds)), SeedTile(values, args.warps))
            warps = constants.pop("num_warps")
            sass, usage = compiled(constants, warps)
            rows.append({"seeding": name, "values": values, "warps": warps, **constants,
                         **usage, "loops": loops(sass)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": rows},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
