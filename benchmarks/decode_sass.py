"""What the decode kernel's main loop costs per decoded value, compiled for a GPU without one.

Compiles ``decode_kernel`` (kernels/triton/decode_kernel.py) for an sm_90 target with the installed
Triton, for each preset's layouts (head dim 128, ``--rows`` query rows a tile: 16 for one query
of four query heads, 64 for sixteen; ``--block-n`` keys a tile, ``--warps`` warps, no pipelining,
``--maxnreg`` registers at most), disassembles it with the ``nvdisasm`` that ships with Triton,
and reports the registers a thread, its stack frame (where spilled registers go), the
instructions of the innermost loop (one key and value tile) by opcode and per decoded value
(2 x block_n x 128 values over the threads), and the instructions after the last loop (the
epilogue: the partial's store, and its rotation where the program rotates it).
``--rotations`` instead counts the instructions of the step's other rotation work: the merge
kernel with and without rotating its row back, and the Hadamard kernel of the queries at 1 and
16 rows a program (4 warps).

    PYTHONPATH=. python3 benchmarks/decode_sass.py --out benchmarks/results/decode_sass_triton36.json
    PYTHONPATH=. python3 benchmarks/decode_sass.py --rows 64 --out benchmarks/results/decode_sass_64_rows_triton36.json
    PYTHONPATH=. python3 benchmarks/decode_sass.py --rotations --out benchmarks/results/rotation_sass_triton36.json

``--fused`` counts the fused prefill kernel's span loop instead (``attention_kernel``, kernels/
triton/attention_kernel.py; ``--rows`` queries a program, ``--block-n`` keys a tile, ``--warps``,
``--stages`` deep pipelining: the first loop of its code, over a span's tiles without the
full-precision tail, whose own loop and that of the full-precision segments follow):

    PYTHONPATH=. python3 benchmarks/decode_sass.py --fused --rows 256 --block-n 64 --warps 8 --stages 3 \
        --out benchmarks/results/fused_sass_triton36.json
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import qkv
from qkv.kernels.triton.attention_kernel import attention_kernel
from qkv.kernels.triton.decode import merge_rotates
from qkv.kernels.triton.decode_kernel import decode_kernel, merge_kernel
from qkv.kernels.triton.hadamard import _hadamard_kernel
from qkv.kernels.triton.records import span_record

POINTERS = {"q_ptr": "*bf16", "qs_ptr": "*bf16", "po_ptr": "*fp32", "cs_ptr": "*fp32",
            "span_ptr": "*i64", "item_ptr": "*i64", "dk0": "*bf16", "dv0": "*bf16", "dk1": "*bf16", "dv1": "*bf16",
            "live_ptr": "*i32"}
LINE = re.compile(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*)")


def tool(name: str) -> str:
    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resources(cubin: pathlib.Path) -> dict:
    """Registers a thread and stack frame bytes (where spilled registers go) of a compiled kernel,
    from the ``cuobjdump`` that ships with Triton."""
    text = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", text).group(1)),
            "stack_bytes": int(re.search(r"STACK:(\d+)", text).group(1))}


def decode_sass(name: str, rows: int, block_n: int, warps: int, maxnreg: int | None, key_scores: bool,
                tmp: str) -> str:
    """SASS of the decode kernel over spans of preset ``name`` (its cubin: tmp/decode_kernel.cubin);
    ``key_scores``: keys with centroids scored through the call's q . c table (``KEY_SCORES``)."""
    k = torch.randn(1, 2, 256, 128).bfloat16()
    # as a cache stores its spans: its newest tokens stay in its own full-precision tail, not in a span
    k_layout, v_layout = span_record(qkv.build_policy(name, window=0).compress(k, k.clone())).layouts
    const = dict(D=128, BLOCK_M=rows, BLOCK_N=block_n, KV_T=tl.bfloat16, DOT_BF16=True, EMULATE=False, HAS_SPANS=True,
                 HAS_DENSE=False, OUT_ROT=merge_rotates(v_layout.ROT, rows), H_NORM=128**-0.5, K=k_layout, V=v_layout,
                 KEY_SCORES=key_scores and k_layout.STAGES > 0, LIVE=False)
    return disassemble(decode_kernel, const, POINTERS, warps, maxnreg, tmp)


def fused_sass(name: str, rows: int, block_n: int, warps: int, stages: int, tmp: str) -> str:
    """SASS of the fused prefill kernel over spans of preset ``name`` (its cubin:
    tmp/attention_kernel.cubin)."""
    k = torch.randn(1, 2, 256, 128).bfloat16()
    k_layout, v_layout = span_record(qkv.build_policy(name, window=0).compress(k, k.clone())).layouts
    const = dict(D=128, BLOCK_M=rows, BLOCK_N=block_n, SPAN_STAGES=stages, DENSE_STAGES=stages, KV_T=tl.bfloat16,
                 DENSE_MULT=8, DOT_BF16=True, OUT_BF16=True, EMULATE=False, HAS_SPANS=True, WRITE_LSE=True,
                 K=k_layout, V=v_layout)
    pointers = {"q_ptr": "*bf16", "out_ptr": "*bf16", "lse_ptr": "*fp32", "dense_ptr": "*i64", "span_ptr": "*i64"}
    return disassemble(attention_kernel, const, pointers, warps, None, tmp, stages=stages)


def disassemble(kernel, const: dict, pointers: dict, warps: int, maxnreg: int | None, tmp: str, stages: int = 1,
                divisible: tuple = (), shared: bool = False, divisible_paths: tuple = (), options: dict | None = None):
    """SASS of ``kernel`` compiled for sm_90 with these constexprs (other arguments: ``pointers``,
    which may name a tuple argument's element types as a tuple, or int32, fp32 for qk_scale),
    ``stages`` deep pipelining, the arguments named in ``divisible`` and the tuple elements at
    ``divisible_paths`` ((argument name, index in the tuple, ...)) specialized as multiples of 16
    (as the JIT specializes them at launch), ``options``: more compile options; the cubin is left
    in ``tmp`` under the kernel's name. ``shared``: (SASS, the shared memory bytes a program takes)."""
    signature = {a: "constexpr" if a in const else pointers.get(a, "fp32" if a == "qk_scale" else "i32")
                 for a in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if a in divisible}
    attrs.update({(kernel.arg_names.index(name), *at): [["tt.divisibility", 16]] for name, *at in divisible_paths})
    compiled = triton.compile(ASTSource(kernel, signature, const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages, "maxnreg": maxnreg,
                                       **(options or {})})
    cubin = pathlib.Path(tmp) / f"{kernel.__name__}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return (sass, compiled.metadata.shared) if shared else sass


def rotations(tmp: str) -> list[dict]:
    """Instructions of the merge kernel (D = 128, bf16 out) without and with its row's rotation,
    and of the Hadamard kernel (bf16 rows of 128) at 1 and 16 rows a program."""
    def count(sass):
        return sum(1 for line in sass.splitlines() if LINE.match(line))

    rows = []
    for rot in (False, True):
        const = dict(D=128, BLOCK_P=16, EMULATE_BF16=False, ROT=rot, H_NORM=128**-0.5)
        sass = disassemble(merge_kernel, const, {"po_ptr": "*fp32", "out_ptr": "*bf16"}, 4, None, tmp)
        rows.append({"kernel": "merge", "rotates": rot, "instructions": count(sass)})
    for block_m in (1, 16):
        const = dict(SQRT_D=128**0.5, D=128, EMULATE=False, BLOCK_M=block_m)
        sass = disassemble(_hadamard_kernel, const, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, 4, None, tmp)
        rows.append({"kernel": "hadamard", "rows": block_m, "instructions": count(sass)})
    for row in rows:
        row.update(triton=triton.__version__, target="sm_90", warps=4)
        print(json.dumps(row), flush=True)
    return rows


def loop_bodies(sass: str) -> tuple[list[list[str]], int]:
    """The opcodes of every loop's body (the instructions a backward branch jumps over), and the
    number of instructions after the last loop (the epilogue: partials written, rotations)."""
    labels, code = {}, []
    pending = []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = LINE.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            code.append((addr, m.group(2), m.group(3)))
    bodies, last = [], 0
    for addr, op, rest in code:
        target = re.search(r"(\.L_x_\d+)", rest)
        if op.startswith("BRA") and target and labels.get(target.group(1), addr + 1) < addr:
            bodies.append([o for a, o, _ in code if labels[target.group(1)] <= a < addr])
            last = addr
    return bodies, sum(1 for a, o, _ in code if a > last and o not in ("NOP", "BRA", "EXIT"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=["qvg", "kivi", "rtn", "quarot", "bf16"])
    parser.add_argument("--rows", type=int, default=16, help="query rows a tile (BLOCK_M)")
    parser.add_argument("--block-n", type=int, default=64)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--maxnreg", type=int, default=None)
    parser.add_argument("--key-scores", action="store_true",
                        help="keys with centroids scored through a q . c table (DecodeTile.key_scores)")
    parser.add_argument("--rotations", action="store_true", help="only the merge and Hadamard kernels (see above)")
    parser.add_argument("--fused", action="store_true", help="the fused prefill kernel's span loop (see above)")
    parser.add_argument("--stages", type=int, default=1, help="pipelining depth (--fused)")
    parser.add_argument("--out", default=None, help="also write the rows here (JSON)")
    args = parser.parse_args()
    if args.stages != 1 and not args.fused:
        parser.error("--stages is the fused kernel's pipelining depth: the decode kernel's loop is counted unpipelined")
    if args.rotations:
        with tempfile.TemporaryDirectory() as tmp:
            rows = rotations(tmp)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        return
    rows = []
    values = 2 * args.block_n * 128 / (32 * args.warps)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            if args.fused:
                sass = fused_sass(name, args.rows, args.block_n, args.warps, args.stages, tmp)
                usage = resources(pathlib.Path(tmp) / "attention_kernel.cubin")
            else:
                sass = decode_sass(name, args.rows, args.block_n, args.warps, args.maxnreg, args.key_scores, tmp)
                usage = resources(pathlib.Path(tmp) / "decode_kernel.cubin")
            bodies, epilogue = loop_bodies(sass)
            # the decode kernel's innermost loop; the fused kernel's first (see above)
            ops = collections.Counter(bodies[0] if args.fused else min(bodies, key=len))
            total = sum(ops.values())
            kernel = {"kernel": "fused", "stages": args.stages} if args.fused else {}
            rows.append({"preset": name, **kernel, "triton": triton.__version__, "target": "sm_90", "rows": args.rows,
                         "block_n": args.block_n, "warps": args.warps, "maxnreg": args.maxnreg, "key_scores": args.key_scores,
                         **usage, "loop_instructions": total,
                         "loop_spill_loads": sum(n for op, n in ops.items() if op.startswith("LDL")),
                         "loop_spill_stores": sum(n for op, n in ops.items() if op.startswith("STL")),
                         "per_value": round(total / values, 2), "epilogue_instructions": epilogue,
                         "opcodes": dict(ops.most_common())})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "opcodes"}), flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
