"""What quantize+pack (its two passes) and dequantize cost a value, compiled for a GPU without one.

Compiles ``_quantize_pack_kernel`` (its speculative pass and its settling pass) and
``_dequantize_kernel`` (kernels/triton/quantize.py) for an sm_90 target with the installed Triton as a compression and
a decompression to bf16 launch them, for the keys of three presets at head dim 128:
qvg (one stage of bf16 centroids subtracted, INT2 mid-rise in blocks of 64, E4M3 scales, bytes
MSB first), rtn (no stage, blocks of 16) and kivi (per channel, asymmetric, fp16 scales and zero
points, int32 words LSB first); pointers, strides, lengths and the stage's pointers and strides
specialized as multiples of 16, as the JIT specializes them at launch. The speculative pass and
dequantize do not loop over their tile: the report is the registers a thread, its stack frame and
the instructions a thread runs at the default tile (4,096 values a program, 4 warps), and what
twice the rows add a value: the kernel's cost a value, which decides its time where it is bound
by instructions rather than bytes. The settling pass loops over its tiles and holds the rarely
taken second quantization of a tile: its instructions are the code's, not what a thread runs, and
it has no figure a value (the default tile's 8 tiles a program).

    PYTHONPATH=. python3 benchmarks/quantize_sass.py --out benchmarks/results/quantize_sass_triton36.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import triton
from decode_sass import LINE, disassemble, resources

import qkv
from qkv.dtypes import max_finite
from qkv.kernels.quantize import HEADROOM
from qkv.kernels.triton.bits import EXACT_LAUNCH
from qkv.kernels.triton.quantize import (
    FORMAT_CODE, MODE_CODE, SETTLE, SPECULATE, _dequantize_kernel, _quantize_pack_kernel,
)
from qkv.kernels.triton.records import code_layout
from qkv.kernels.triton.tiles import QuantizeTile

# kernel -> (the JIT function, values a program of its default tile, its pass)
KERNELS = {"quantize_pack": (_quantize_pack_kernel, 4096, SPECULATE), "settle": (_quantize_pack_kernel, 4096, SETTLE),
           "dequantize": (_dequantize_kernel, 4096, None)}
POINTER_TYPES = {"bfloat16": "*bf16", "uint8": "*u8", "int32": "*i32", "float8_e4m3fn": "*fp8e4nv", "float16": "*fp16"}
DIVISIBLE = ("x_ptr", "codes_ptr", "scales_ptr", "zeros_ptr", "raw_ptr", "low_ptr", "part_ptr", "mult_ptr", "out_ptr",
             "x_sn", "x_sr", "R", "L", "P", "G", "D", "S", "OUT_N")


def compressed(preset: str):
    import torch

    return qkv.build_policy(preset).k.compress(torch.randn(1, 1, 256, 128).bfloat16())


def constants(preset: str, block_r: int, pass_: int = SPECULATE) -> tuple[dict, dict, bool]:
    """The kernel's constexprs, pointer types and whether it subtracts a stage, for ``preset``'s
    keys at head dim 128 (its format from a compression of a small span)."""
    ct = compressed(preset)
    q = ct.format.codes
    length = 128 if q.axis == "token" else 256
    block_l = max(min(triton.next_power_of_2(length), 512), q.block, q.pack.word_bits)
    const = dict(BITS=q.bits, QBLOCK=q.block, MODE=MODE_CODE[q.mode], OFFSET=q.offset, STEPS=q.steps,
                 LEVELS=q.levels, ZERO_CODE=float(q.offset // 1), FMT=FORMAT_CODE[q.scale], PASS=pass_,
                 LIMIT=max_finite(q.scale_dtype) * HEADROOM, TOKEN_AXIS=q.axis == "token", WORD=q.pack.word_bits,
                 MSB=q.pack.msb_first, BLOCK_R=block_r, BLOCK_L=block_l,
                 SETTLE_TILES=QuantizeTile().settle_tiles if pass_ == SETTLE else 1)
    pointers = {"x_ptr": "*bf16", "codes_ptr": POINTER_TYPES[str(q.pack.container).split(".")[1]],
                "scales_ptr": POINTER_TYPES[str(q.scale_dtype).split(".")[1]], "raw_ptr": "*fp32", "low_ptr": "*fp32",
                "part_ptr": "*fp32", "mult_ptr": "*fp32"}
    pointers["zeros_ptr"] = pointers["scales_ptr"]
    return const, pointers, bool(ct.stages and ct.stages[0].centroids is not None)


def dequantize_constants(preset: str, block_s: int) -> tuple[dict, dict, bool]:
    """The dequantize kernel's constexprs (``block_s`` tokens a program, a bf16 output; both names of
    the output flag the kernel has had), pointer types and whether it adds a stage, for
    ``preset``'s keys at head dim 128."""
    import torch

    ct = compressed(preset)
    q = ct.format.codes
    added = [st for st in ct.stages if st.centroids is not None]
    layout = code_layout(q, 128, None if q.scale == "fp32" else torch.ones(1), [st.centroids for st in added],
                         [st.assignments for st in added])
    const = dict(LAYOUT=layout, D=128, OUT_BF16=True, PAIRS=True, EMULATE=False, LIMIT=max_finite(torch.bfloat16),
                 BLOCK_S=block_s, BLOCK_D=128, BLOCK_L=128)
    scales = POINTER_TYPES[str(q.scale_dtype).split(".")[1]]
    pointers = {"codes_ptr": POINTER_TYPES[str(q.pack.container).split(".")[1]], "scales_ptr": scales,
                "zeros_ptr": scales, "mult_ptr": "*fp32", "out_ptr": "*bf16"}
    return const, pointers, bool(added)


def compile_counts(name: str, preset: str, block_r: int, warps: int, tmp: str) -> dict:
    kernel, _, pass_ = KERNELS[name]
    if name == "dequantize":
        const, pointers, staged = dequantize_constants(preset, block_r)
    else:
        const, pointers, staged = constants(preset, block_r, pass_)
    values = block_r * const["BLOCK_L"]
    const = {k: v for k, v in const.items() if k in kernel.arg_names}
    pointers["stages"] = (("*bf16", "*u8", "i32", "i32", "i32"),) if staged else ()
    paths = tuple(("stages", 0, j) for j in range(4)) if staged else ()
    sass = disassemble(kernel, const, pointers, warps, None, tmp, divisible=DIVISIBLE, divisible_paths=paths,
                       options=EXACT_LAUNCH)
    return {**resources(pathlib.Path(tmp) / f"{kernel.__name__}.cubin"),
            "instructions": sum(1 for line in sass.splitlines() if LINE.match(line)),
            "values_a_thread": values // (32 * warps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["qvg", "rtn", "kivi"])
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, values, pass_) in KERNELS.items():
            for preset in args.presets:
                block_l = 128 if name == "dequantize" else constants(preset, 1)[0]["BLOCK_L"]
                block_r = max(1, min(64 if name != "dequantize" else 128, values // block_l))  # as launched
                tile = compile_counts(name, preset, block_r, 4, tmp)
                a_value = None
                if pass_ != SETTLE:
                    double = compile_counts(name, preset, 2 * block_r, 4, tmp)
                    a_value = ((double["instructions"] - tile["instructions"])
                               / (double["values_a_thread"] - tile["values_a_thread"]))
                rows.append({"kernel": name, "preset": preset, "triton": triton.__version__, "target": "sm_90",
                             **tile, "instructions_a_value": a_value})
                print(rows[-1])
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
