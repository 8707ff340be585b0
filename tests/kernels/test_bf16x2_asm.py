"""The PTX of the attention kernels' bf16x2 code decoder (``tile.bf16x2_unpack_asm``), run by a
small emulator of the instructions it uses on fresh random words, scales and zeros: every value it
produces is the reference dequantization ``(code - offset) * scale`` of a bf16 scale rounded once
to bf16, in the codes' order. The GPU tests (test_decode.py, test_attention.py) run
the same text on the device; this one checks its bit manipulation everywhere."""

import math

import numpy as np
import pytest

pytest.importorskip("triton")

from qkv.format import AffineFormat, PackFormat  # noqa: E402
from qkv.kernels.triton.tile import bf16x2_constraints, bf16x2_fits, bf16x2_unpack_asm  # noqa: E402


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
    data = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(data[sel >> (4 * i) & 7] for i in range(4)), "little")


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
