"""What the k-means assignment kernel's loop over centroid tiles costs, compiled for a GPU without one.

Compiles ``_assign_kernel`` (kernels/triton/kmeans/assign.py) for an sm_90 target with the installed
Triton as a LongCat-Video span launches it (bf16 tokens, head dim 128, a row factor, the pointers,
the head dim, the strides and the padded cluster count specialized as multiples of 16, Triton's
default pipelining of 3), for each ``--tiles`` entry (tokens x centroids x warps), disassembles it
with the ``nvdisasm`` that ships with Triton and reports the registers a thread, its stack frame
and the instructions of the loop over centroid tiles by opcode: a warp's instructions for one tile
of tokens x centroids distances (16 x 32 products per tensor-core instruction group).
``--resident`` compiles ``_assign_resident_kernel`` instead (all 256 centroids one tile kept on
chip; ``--tiles`` entries tokens x warps x pipelining depth), its loop over token tiles (the
software-pipelined copy that rows of factor 1 take; the unpipelined copy of rows outside the safe
range in ``other_loops_instructions``), and the shared memory a program takes. ``--peaks``: the
pass that also measures each row's max |x|, every factor taken to be 1 (k-means's first pass when
the peaks are not given).

    PYTHONPATH=. python3 benchmarks/assign_sass.py --out benchmarks/results/assign_sass_triton36.json
    PYTHONPATH=. python3 benchmarks/assign_sass.py --resident --tiles 64x4x3 64x4x2 64x8x3 128x8x3 \
        --out benchmarks/results/assign_sass_resident_triton36.json
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import tempfile

import triton
from decode_sass import disassemble, loop_bodies, resources

from qkv.kernels.triton.kmeans.assign import _assign_kernel, _assign_resident_kernel

POINTERS = {"x_ptr": "*bf16", "f_ptr": "*fp32", "c_ptr": "*bf16", "csq_ptr": "*fp32", "idx_ptr": "*i64",
            "dist_ptr": "*fp32", "top_ptr": "*i32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", nargs="+", default=["128x32x4", "64x64x4", "128x64x8"],
                        help="tokens x centroids x warps a program")
    parser.add_argument("--resident", action="store_true",
                        help="the kernel that keeps 256 centroids on chip (tiles: tokens x warps x stages)")
    parser.add_argument("--peaks", action="store_true",
                        help="the pass that also measures the rows' peaks, every factor taken to be 1 (k-means's "
                             "first pass when it does not know them)")
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    kernel = _assign_resident_kernel if args.resident else _assign_kernel
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.tiles:
            if args.resident:
                (tokens, warps, stages), clusters = map(int, spec.split("x")), 256
            else:
                (tokens, clusters, warps), stages = map(int, spec.split("x")), 3
            const = dict(D=128, X_EXACT=True, HAS_SCALE=True, EMULATE=False, PEAKS=args.peaks, REDO=False,
                         BLOCK_S=tokens, BLOCK_C=clusters, BLOCK_D=128)
            divisible = (*POINTERS, "C", "CP", "D", "XN", "XS")
            sass, shared = disassemble(kernel, const, POINTERS, warps, None, tmp, stages=stages, divisible=divisible,
                                       shared=True)
            bodies, _ = loop_bodies(sass)
            # the loop over centroid (or token) tiles: of the loops with tensor-core products, the
            # software-pipelined one (the on-chip kernel's copy for rows of factor 1); the others'
            # lengths beside it (its copy for scaled rows)
            products = [b for b in bodies if any(op.startswith(("HGMMA", "HMMA")) for op in b)] or bodies
            main = max(products, key=lambda b: (any(op.startswith("LDGSTS") for op in b), len(b)))
            ops = collections.Counter(main)
            rows.append({"tile": spec, "kernel": kernel.__name__, "triton": triton.__version__, "target": "sm_90",
                         **resources(pathlib.Path(tmp) / f"{kernel.__name__}.cubin"), "shared_bytes": shared,
                         "loop_instructions": sum(ops.values()),
                         "other_loops_instructions": [len(b) for b in products if b is not main],
                         "opcodes": dict(ops.most_common())})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "opcodes"}), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
