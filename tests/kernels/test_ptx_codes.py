"""The PTX of the decode kernel's code decoders (``qkv.kernels.triton.ptx_codes``), run by a small
emulator of the instructions they use on fresh random words, scales and values. The bf16x2
decoder: every value it produces is the reference dequantization ``(code - offset) * scale`` of a
bf16 scale rounded once to bf16, in the codes' order. The table decoder: every value is its code's
entry of the block's four fp32 values rounded once to bf16. This checks their bit manipulation
everywhere, and that the decode kernel with each decoder compiles for sm_90 (ptxas reads the PTX);
on a GPU, a span's tiles decoded to bf16 by either decoder equal the fp32 path's rounded once (the
attention tests in test_decode.py and test_attention.py run the same texts there too)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import qkv  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from qkv import kernels  # noqa: E402
from qkv.kernels import CompressedSpan, SpanPlan  # noqa: E402
from qkv.kernels.triton import decode  # noqa: E402
from qkv.kernels.triton.attention_kernel import S_K, S_TOKENS, S_V  # noqa: E402

from qkv.format import AffineFormat, PackFormat  # noqa: E402
from qkv.kernels.triton.ptx_codes import (  # noqa: E402
    bf16x2_constraints, bf16x2_fits, bf16x2_unpack_asm, table_asm, table_constraints, table_fits, table_slot,
    table_unpack_asm)
from qkv.kernels.triton.tile import decode_tile, record_source  # noqa: E402


def bf16_round(x: float) -> float:
    """x rounded to bf16, to nearest even (normal numbers)."""
    if x == 0.0:
        return 0.0
    m, e = math.frexp(x)
    scaled = m * 256.0
    r = round(scaled)  # Python rounds halves to even
    return math.ldexp(r, e - 8)


def bf16_value(h: int) -> float:
    return float(np.array([h << 16], dtype=np.uint32).view(np.float32)[0])


def f32_value(r: int) -> float:
    return float(np.array([r], dtype=np.uint32).view(np.float32)[0])


def f32_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def bf16_bits(x: float) -> int:
    return int(np.array([x], dtype=np.float32).view(np.uint32)[0]) >> 16


def halves(r: int) -> tuple[float, float]:
    return bf16_value(r & 0xFFFF), bf16_value(r >> 16)


def fma_bf16x2(a: int, b: int, c: int) -> int:
    out = 0
    for i, (x, y, z) in enumerate(zip(halves(a), halves(b), halves(c))):
        out |= bf16_bits(bf16_round(x * y + z)) << (16 * i)
    return out


def prmt(a: int, b: int, sel: int) -> int:
    """PTX's generic byte permute: selector nibble i (of the low 16 bits) picks byte i of d from
    the 8 bytes of {b, a}; a nibble's msb replicates the picked byte's sign bit instead."""
    data = (b << 32 | a).to_bytes(8, "little")
    out = []
    for i in range(4):
        nibble = sel >> (4 * i) & 15
        byte = data[nibble & 7]
        out.append((0xFF if byte & 0x80 else 0) if nibble & 8 else byte)
    return int.from_bytes(bytes(out), "little")


def lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = (a >> bit & 1) << 2 | (b >> bit & 1) << 1 | (c >> bit & 1)
        out |= (lut >> idx & 1) << bit
    return out


def run(asm: str, operands: dict[int, int]) -> dict[int, int]:
    """Execute the PTX text on 32-bit registers: ``$i`` operands in, ``$i`` outputs out."""
    regs = {f"${i}": v for i, v in operands.items()}

    def val(tok: str) -> int:
        tok = tok.strip()
        return regs[tok] if tok in regs else int(tok, 0) & 0xFFFFFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        x = [val(s) for s in src]
        if op == "mov.b32":
            regs[d] = x[0]
        elif op == "prmt.b32":
            regs[d] = prmt(*x)
        elif op == "shr.b32":
            regs[d] = x[0] >> x[1]
        elif op == "shl.b32":
            regs[d] = x[0] << x[1] & 0xFFFFFFFF
        elif op == "lop3.b32":
            regs[d] = lop3(*x)
        elif op == "fma.rn.bf16x2":
            regs[d] = fma_bf16x2(*x)
        elif op == "and.b32":
            regs[d] = x[0] & x[1]
        elif op == "mad.lo.u32":
            regs[d] = (x[0] * x[1] + x[2]) & 0xFFFFFFFF
        elif op == "cvt.rn.bf16x2.f32":  # a to the high half, b to the low
            regs[d] = bf16_bits(bf16_round(f32_value(x[0]))) << 16 | bf16_bits(bf16_round(f32_value(x[1])))
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs


@pytest.mark.parametrize("bits, mode, word_bits, msb", [
    (2, "midrise", 8, True), (2, "sym", 8, True), (2, "midrise", 32, False), (2, "sym", 32, True),
    (1, "midrise", 8, True), (1, "midrise", 32, False), (1, "midrise", 8, False),
])
def test_every_value_is_the_reference_rounded_once(bits, mode, word_bits, msb):
    fmt = AffineFormat(bits, 32, mode, "token", "fp32", PackFormat(word_bits, msb))
    offset = fmt.offset
    assert bf16x2_fits(word_bits, bits, msb, offset)
    asm = bf16x2_unpack_asm(word_bits, bits, msb, offset)
    n_out = bf16x2_constraints(word_bits, bits).split(",").count("=r")
    pack = 4 if word_bits == 8 else 1
    per = word_bits // bits
    rng = np.random.default_rng(bits * 100 + word_bits + msb)
    for _ in range(20):
        words = [int(w) for w in rng.integers(0, 2**word_bits, pack)]
        scales = [bf16_round(float(rng.uniform(0.01, 3.0))) for _ in range(pack)]
        ops = {n_out: int.from_bytes(bytes(words), "little") if word_bits == 8 else words[0]}  # outputs come first
        for e in range(pack):
            ops[n_out + 1 + e] = bf16_bits(scales[e]) * 0x10001
        regs = run(asm, ops)
        for e in range(pack):
            codes = [(words[e] >> ((per - 1 - j) * bits if msb else j * bits)) & ((1 << bits) - 1) for j in range(per)]
            got = []
            for k in range(per // 2):
                got.extend(halves(regs[f"${k * pack + e}"]))
            assert got == [bf16_round((c - offset) * scales[e]) for c in codes], (words[e], codes)


def test_codes_that_do_not_fit_fall_back():
    assert not bf16x2_fits(8, 4, True, 7.5)  # 4-bit codes: 128 + code * 2**a leaves the mantissa
    assert not bf16x2_fits(8, 2, True, 0.25)  # an offset that is not a multiple of 1/2


@pytest.mark.parametrize("bits, msb", [(2, False), (2, True), (1, False), (1, True)])
def test_every_value_is_its_codes_table_entry_rounded_once(bits, msb):
    """A block's four fp32 values (of either sign, of magnitudes apart by powers of two) become the
    table's two registers; every code of a random 32-bit word is looked up as its entry rounded
    once to bf16, at the output and half that ``table_slot`` names."""
    assert table_fits(32, bits) and not table_fits(8, bits) and not table_fits(32, 3)
    per, n_out = 32 // bits, table_constraints(bits).split(",").count("=r")
    assert n_out == per // 2
    rng = np.random.default_rng(bits * 10 + msb)
    for _ in range(50):
        values = [float(np.float32(v)) for v in rng.standard_normal(4) * 2.0 ** rng.integers(-20, 20, 4)]
        table = run(table_asm(), {2 + c: f32_bits(v) for c, v in enumerate(values)})
        word = int(rng.integers(0, 2**32))
        regs = run(table_unpack_asm(bits, msb), {n_out: word, n_out + 1: table["$0"], n_out + 2: table["$1"]})
        for i in range(per):
            code = (word >> ((per - 1 - i) * bits if msb else i * bits)) & ((1 << bits) - 1)
            where = table_slot(bits, msb, i)
            got = halves(regs[f"${where // 2}"])[where % 2]
            assert got == bf16_round(values[code]), (hex(word), i, code)


def test_the_decode_kernel_with_each_decoder_compiles_for_sm90(tmp_path):
    """kivi's codes (zero points) take the table decoder, rtn's the bf16x2 one: ptxas assembles
    either decode kernel for sm_90 (benchmarks/decode_sass.py, run without the interpreter that
    the other tests use; no GPU needed), each tile with its products and its PRMT decoding."""
    root = pathlib.Path(__file__).parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    out = tmp_path / "sass.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "decode_sass.py"), "kivi", "rtn", "--block-n", "128",
                    "--warps", "4", "--maxnreg", "128", "--out", str(out)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=600)
    kivi, rtn = (row["opcodes"] for row in json.loads(out.read_text()))
    assert kivi["HMMA.16816.F32.BF16"] == rtn["HMMA.16816.F32.BF16"] == 64  # a 128-key tile's products
    # 256 values a thread: kivi's looked up, a PRMT a pair (no fp32 multiply-add a value any more),
    # rtn's scaled two a bf16x2 multiply
    assert kivi["PRMT"] >= 128 and kivi.get("FFMA", 0) < 128 and rtn["HMUL2.BF16_V2"] >= 128


@triton.jit
def _tiles(span_ptr, out_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
           ARITH: tl.constexpr, RUNS: tl.constexpr):
    """The key and value tiles of (batch, head) ``program_id(1)`` of span 0 of a span table, decoded
    with ``ARITH`` (and ``RUNS``, see ``decode_tile``) and rounded to bf16: out [2, B * H, S, D] (keys,
    then values)."""
    t0 = tl.program_id(0) * BLOCK_N
    n = tl.program_id(1).to(tl.int64)
    S = tl.load(span_ptr + S_TOKENS).to(tl.int32)
    tok = t0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    at = out_ptr + (n * S + tok[:, None]) * D + d[None, :]
    k = decode_tile(record_source(span_ptr + S_K, n, D, K, tl.bfloat16), t0, S, K, D, BLOCK_N, D, False, ARITH, RUNS)
    v = decode_tile(record_source(span_ptr + S_V, n, D, V, tl.bfloat16), t0, S, V, D, BLOCK_N, D, False, ARITH, RUNS)
    tl.store(at, k.to(tl.bfloat16), mask=(tok < S)[:, None])
    tl.store(at + tl.num_programs(1) * S * D, v.to(tl.bfloat16), mask=(tok < S)[:, None])


def decoded_tiles(name: str, device: str, ariths: tuple[str, ...], runs: bool = False, tokens: int = 512) -> dict:
    """A span of preset ``name`` ([2, 4, tokens, 128] bf16 K and V, no window) decoded tile by tile
    with each arithmetic (and ``runs``): {arith: [2, 8, tokens, 128] bf16}, and under "decompressed"
    the span's K and V as ``kernels.decompress`` gives them, in the same layout."""
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(2, 4, tokens, 128, generator=gen).mul(3).bfloat16().to(device) for _ in range(2))
    span = CompressedSpan(qkv.build_policy(name, window=0).compress(k, v), 0)
    group = decode.plan_table(SpanPlan([span]), k.device, 64).groups[0]
    outs = {"decompressed": torch.stack([kernels.decompress(t).flatten(0, 1) for t in (span.ckv.k, span.ckv.v)])}
    for arith in ariths:
        out = torch.zeros(2, 8, tokens, 128, dtype=torch.bfloat16, device=device)
        _tiles[(tokens // 64, 8)](group.table, out, D=128, BLOCK_N=64, K=group.layouts[0], V=group.layouts[1],
                                  ARITH=arith, RUNS=runs, num_warps=4)
        outs[arith] = out
    return outs


@pytest.mark.parametrize("name", ["kivi", "rtn"])
def test_the_tile_kernel_decodes_the_span_in_fp32(name):
    """The tile kernel of the GPU test below, in the fp32 arithmetic (the interpreter's): its tiles
    are the span's decompressed values (bf16, rounded once from the reference's fp32) up to the
    fused multiply-add's rounding, at most one bf16 step."""
    outs = decoded_tiles(name, "cuda" if torch.cuda.is_available() else "cpu", ("fma",), tokens=128)
    got, want = outs["fma"].float(), outs["decompressed"].float()
    assert want.abs().max() > 0 and torch.allclose(got, want, rtol=2**-7, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter runs no PTX")
@pytest.mark.parametrize("name", ["kivi", "rtn"])
def test_a_gpu_decodes_tiles_to_the_fp32_paths_values_rounded_once(name):
    """On a GPU, the decode kernel's tile decoder straight to bf16 (kivi's keys per channel and
    values per token: the table; rtn's: bf16x2 with a bf16-exact fp8 scale) gives every value of a
    span's key and value tiles exactly as the fp32 path's, rounded once to bf16."""
    outs = decoded_tiles(name, "cuda", ("fma", "bf16x2"))
    assert torch.equal(outs["bf16x2"], outs["fma"])


@pytest.mark.parametrize("name", ["kivi", "rtn", "qvg-pro"])
def test_tiles_loaded_as_runs_decode_to_the_same_values(name):
    """``decode_tile``'s RUNS changes how the packed words are loaded (each row's words as one run:
    kivi's keys per channel, values per token; rtn's and qvg-pro's per token, with four stages of
    centroids), not a value: every arithmetic gives the same bits with and without."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ariths = ("fma", "bf16x2") if device == "cuda" else ("fma",)
    plain, runs = (decoded_tiles(name, device, ariths, runs=r, tokens=128) for r in (False, True))
    for arith in ariths:
        assert plain[arith].abs().max() > 0 and torch.equal(runs[arith], plain[arith])
