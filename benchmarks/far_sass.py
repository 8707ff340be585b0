"""What the far tokens' ranking kernel costs, compiled for a GPU without one.

Compiles ``_rank_segments_kernel`` (kernels/triton/kmeans/far.py) for an sm_90 target with the
installed Triton, 128 keys a program, for each ``--steps`` entry (the row's keys a step x warps),
disassembles it with the ``nvdisasm`` that ships with Triton and reports the registers a thread,
its stack frame (spills), the instructions a warp of the loop over the row's keys, and a warp's
instructions for one row of a LongCat-Video span's re-seeding (1,058 segment keys: 9 programs).

    PYTHONPATH=. python3 benchmarks/far_sass.py --out benchmarks/results/far_sass_triton36.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import triton
from decode_sass import disassemble, loop_bodies, resources

from qkv.kernels.triton.kmeans.far import FAR_RANK_TILE, _rank_segments_kernel

SEGMENTS = 1058  # a LongCat-Video row: 29,640 tokens in 4 x 256 segments of 28
CLUSTERS = 256  # the sizes each program reads first (a row without an empty cluster stops there)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=["32x4", "32x8", "64x8", "128x4", "128x8"],
                        help="the row's keys a step x warps a program")
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.steps:
            step, warps = map(int, spec.split("x"))
            sass = disassemble(_rank_segments_kernel,
                               dict(HAS_COUNTS=True, BLOCK_C=CLUSTERS, BLOCK_R=FAR_RANK_TILE, BLOCK_H=step),
                               {"key_ptr": "*i64", "out_ptr": "*i64", "cnt_ptr": "*fp32"}, warps, None, tmp)
            bodies, _ = loop_bodies(sass)
            loop = len(max(bodies, key=len))
            programs = -(-SEGMENTS // FAR_RANK_TILE)
            rows.append({"step": step, "warps": warps, "triton": triton.__version__, "target": "sm_90",
                         **resources(pathlib.Path(tmp) / "_rank_segments_kernel.cubin"),
                         "loop_instructions_a_warp": loop,
                         "warp_instructions_a_row": programs * -(-SEGMENTS // step) * loop * warps})
            print(rows[-1])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
