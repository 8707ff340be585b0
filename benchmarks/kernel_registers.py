"""Registers and spills of the span decompression, merge and weighted D^2 sampling kernels per launch
variant, compiled for a GPU without one.

Compiles each kernel for an sm_90 target with the installed Triton (as ``decode_sass.py`` does for
the decode kernel) and reads its registers a thread and stack frame (where spilled registers go)
with the ``cuobjdump`` that ships with Triton. A latency-bound kernel keeps more programs on a
multiprocessor with fewer registers; these rows show which launch variants differ, a GPU sweep
(``tune_tiles.py``) says which is faster.

- ``decompress``: qvg (64 clusters) layouts, 16-key tiles, 4 warps; K and V by one program
  (``split`` false) or two;
- ``merge``: bf16 parts folded into a running fp32 state, 1 or 4 parts a launch, rows of 128 values
  (head dim 128) at 8 and 32 rows a program;
- ``kmeanspp``: the seedings' rows as the default tile launches them: k-means||'s reduction
  (1,024 candidates, 256 picks in 1 + ``REDUCE_ROUNDS`` rounds) and k-means++ (4,096 subsample
  tokens, a pick a round), head dim 128.

    PYTHONPATH=. python3 benchmarks/kernel_registers.py --out benchmarks/results/kernel_registers_triton39.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import torch
import triton
import triton.language as tl
from decode_sass import resources
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import qkv
from qkv.dtypes import max_finite
from qkv.grouping.kmeans import REDUCE_ROUNDS
from qkv.kernels.kmeans import round_sizes
from qkv.kernels.triton.decompress import decompress_kernel
from qkv.kernels.triton.kmeans.seeding import _kmeanspp_kernel, kmeanspp_launch
from qkv.kernels.triton.merge import _merge_kernel
from qkv.kernels.triton.records import span_record
from qkv.kernels.triton.tiles import DEFAULTS


def usage(kernel, pointers: dict, constants: dict, options: dict) -> dict:
    """Registers and stack bytes of ``kernel`` compiled for sm_90 (``pointers``: the pointer
    arguments' types, every other runtime argument an i32)."""
    signature = {a: "constexpr" if a in constants else pointers.get(a, "i32") for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return resources(cubin)


def rows() -> list[dict]:
    out = []
    k = torch.randn(1, 2, 256, 128).bfloat16()
    k_layout, v_layout = span_record(qkv.build_policy("qvg", clusters=64).compress(k, k.clone())).layouts
    for split in (False, True):
        constants = dict(D=128, BLOCK_N=16, KV_T=tl.bfloat16, LIMIT=max_finite(torch.bfloat16), PAIRS=True,
                         EMULATE=False, SPLIT=split, K=k_layout, V=v_layout)
        out.append({"kernel": "decompress", "split": split, "block_n": 16, "warps": 4,
                    **usage(decompress_kernel, {"span_ptr": "*i64", "item_ptr": "*i64", "k_out": "*bf16", "v_out": "*bf16"},
                            constants, {"num_warps": 4, "enable_fp_fusion": False})})
    merge_pointers = {"out_ptr": "*fp32", "lse_ptr": "*fp32", **{f"o{i}": "*bf16" for i in range(4)},
                      **{f"l{i}": "*fp32" for i in range(4)}}
    for parts in (1, 4):
        for block_s in (8, 32):
            constants = dict(N=parts, HAS_STATE=True, BLOCK_S=block_s, BLOCK_D=128)
            out.append({"kernel": "merge", "parts": parts, "block_s": block_s, "warps": 4,
                        **usage(_merge_kernel, merge_pointers, constants, {"num_warps": 4})})
    # kmeans||'s reduction (1,024 candidates, rounds of up to 8 picks at 256 clusters) and k-means++ (a pick a round)
    for points, clusters, rounds in ((1024, 256, 1 + REDUCE_ROUNDS), (4096, 256, 256)):
        # bf16 points, as the seedings pass bf16 tokens
        constants = kmeanspp_launch(points, 128, max(round_sizes(clusters, rounds)), DEFAULTS["kmeanspp"], 2)
        warps, stages = constants.pop("num_warps"), constants.pop("num_stages")
        out.append({"kernel": "kmeanspp", "points": points, "rounds": rounds, "block_k": constants["BLOCK_K"],
                    "round_p": constants["ROUND_P"], "dims": constants["DIMS"], "warps": warps,
                    **usage(_kmeanspp_kernel, {"p_ptr": "*bf16", "pt_ptr": "*bf16", "w_ptr": "*fp32", "e_ptr": "*fp32",
                                               "out_ptr": "*i64", "near_ptr": "*fp32"}, {**constants, "EMULATE": False},
                            {"num_warps": warps, "num_stages": stages})})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    result = rows()
    for row in result:
        print(json.dumps(row), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"triton": triton.__version__, "target": "sm_90", "rows": result},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
