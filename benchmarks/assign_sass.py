"""What the k-means assignment kernel's loop over centroid tiles costs, compiled for a GPU without one.

Compiles ``_assign_kernel`` (kernels/triton/kmeans.py) for an sm_90 target with the installed
Triton as a LongCat-Video span launches it (bf16 tokens, head dim 128, a row factor, the pointers,
the head dim, the strides and the padded cluster count specialized as multiples of 16, Triton's
default pipelining of 3), for each ``--tiles`` entry (tokens x centroids x warps), disassembles it
with the ``nvdisasm`` that ships with Triton and reports the registers a thread, its stack frame
and the instructions of the loop over centroid tiles by opcode: a warp's instructions for one tile
of tokens x centroids distances (16 x 32 products per tensor-core instruction group).

    PYTHONPATH=. python3 benchmarks/assign_sass.py --out benchmarks/results/assign_sass_triton36.json
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import tempfile

import triton
from decode_sass import disassemble, loop_bodies, resources

from qkv.kernels.triton.kmeans import _assign_kernel

POINTERS = {"x_ptr": "*bf16", "f_ptr": "*fp32", "c_ptr": "*bf16", "csq_ptr": "*fp32", "idx_ptr": "*i64",
            "dist_ptr": "*fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", nargs="+", default=["128x32x4", "64x64x4", "128x64x8"],
                        help="tokens x centroids x warps a program")
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    constexprs = {p.name for p in _assign_kernel.params if p.is_constexpr}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.tiles:
            tokens, clusters, warps = map(int, spec.split("x"))
            const = dict(X_EXACT=True, HAS_SCALE=True, EMULATE=False, BLOCK_S=tokens, BLOCK_C=clusters, BLOCK_D=128)
            if "D" in constexprs:
                const["D"] = 128
            divisible = (*POINTERS, "C", "CP", "D", "XN", "XS")
            sass = disassemble(_assign_kernel, const, POINTERS, warps, None, tmp, stages=3, divisible=divisible)
            bodies, _ = loop_bodies(sass)
            ops = collections.Counter(max(bodies, key=len))  # the loop over centroid tiles
            rows.append({"tile": spec, "triton": triton.__version__, "target": "sm_90",
                         **resources(pathlib.Path(tmp) / "_assign_kernel.cubin"),
                         "loop_instructions": sum(ops.values()), "opcodes": dict(ops.most_common())})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "opcodes"}), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
