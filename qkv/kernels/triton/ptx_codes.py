"""Inline-PTX decoders of packed codes straight to bf16, for the attention kernels on a GPU with bf16
products (``ARITH`` "bf16x2" in :mod:`qkv.kernels.triton.tile`; Triton's interpreter runs no PTX,
so ``tests/kernels/test_ptx_codes.py`` runs these texts through an emulator of their instructions).

Two decoders, each giving a tuple of bf16 tensors (a word's codes in order), which ``tile`` spreads
along the row:

- :func:`unpack_bf16x2`, codes of at most 3 bits without zero points (qvg, rtn, quarot): two
  neighbouring codes are put into the mantissa of bf16 128.0 and scaled by one bf16x2 fused
  multiply-add with a bf16 scale, each value rounded once from that scale.
- :func:`unpack_table`, codes of at most 2 bits in 32-bit words (kivi, whose zero points keep it
  off the first: a bf16 zero point and scale shifted values by an ulp often enough to double the
  attention's error): a block's values are four, computed in fp32 and rounded once to bf16 into a
  table of two registers, and each pair of codes is looked up by one PRMT whose selector is made
  from the codes (a shift, a mask and a multiply-add for every four codes).
"""

import triton
import triton.language as tl


@triton.constexpr_function
def _code_pairs(word_bits: int, bits: int, msb: bool, offset: float) -> list | None:
    """Per pair k of neighbouring codes 2k, 2k + 1 of a word (see :func:`bf16x2_unpack_asm`): the
    byte holding both, the right shift (negative: left) that puts the lower of the two at bit 1,
    the low and high masks, the bf16 pair 2**-a : 2**-b (a, b: the codes' bits after the shift),
    and the pair -(128 + offset * 2**a) : -(128 + offset * 2**b). None where the codes do not fit
    the mantissa (more than 3 bits) or an offset times 2**a is not a whole number below 128."""
    per = word_bits // bits
    if bits > 3:
        return None
    pairs = []
    for k in range(per // 2):
        lo, hi = ((per - 1 - j) * bits if msb else j * bits for j in (2 * k, 2 * k + 1))  # bit offsets
        shift = min(lo, hi) % 8 - 1
        lo_at, hi_at = lo % 8 - shift, hi % 8 - shift
        code = (1 << bits) - 1
        lo_off, hi_off = offset * 2**lo_at, offset * 2**hi_at  # -(128 + these) is bf16 0xC300 | these
        if not all(x == int(x) and 0 <= x < 128 for x in (lo_off, hi_off)):
            return None
        pairs.append((lo // 8, shift, code << lo_at | code << hi_at << 16,
                      (127 - hi_at) << 23 | (127 - lo_at) << 7, (0xC300 | int(hi_off)) << 16 | 0xC300 | int(lo_off)))
    return pairs


@triton.constexpr_function
def bf16x2_fits(word_bits: int, bits: int, msb: bool, offset: float) -> bool:
    """Whether :func:`bf16x2_unpack_asm` decodes this packing (codes of at most 3 bits)."""
    return _code_pairs(word_bits, bits, msb, offset) is not None


@triton.constexpr_function
def bf16x2_unpack_asm(word_bits: int, bits: int, msb: bool, offset: float) -> str:
    """PTX that turns packed words into bf16 values ``(code - offset) * scale``, two neighbouring
    codes a 32-bit result. Operands (see :func:`unpack_bf16x2`): one output per pair of codes of a
    word, then the words and the scale pairs (int32 holding a bf16 twice). A uint8 word tile is
    packed 4 words to a register (``pack=4``), an int32 one a word (``pack=1``). The byte holding
    codes 2k and 2k + 1 is copied to bits 0 and 16 (PRMT) and shifted so that both codes fall in
    the mantissa of bf16 128.0, at bits a and b (a or b is 1),
    then masked into it (LOP3: 128 + code * 2**a, exact); taking 128 + offset * 2**a off is exact
    ((code - offset) * 2**a: offsets are multiples of 1/2), and one bf16x2 fused multiply-add with
    the scale times 2**-a, 2**-b (exact) gives both values, rounded once."""
    pack = 4 if word_bits == 8 else 1
    pairs = _code_pairs(word_bits, bits, msb, offset)
    w = len(pairs) * pack  # the word operand; then the scales
    lines = ["{", ".reg .b32 t, u, s, one, nz, f, base;", "mov.b32 one, 0x3F803F80;", "mov.b32 nz, 0x80008000;"]
    for k in range(len(pairs)):
        byte, shift, mask, factor, base = pairs[k]
        lines.append(f"mov.b32 f, {factor:#x};")
        lines.append(f"mov.b32 base, {base:#x};")
        for e in range(pack):
            src = byte if word_bits != 8 else e
            lines.append(f"prmt.b32 t, ${w}, 0, {src | 4 << 4 | src << 8 | 4 << 12};")
            if shift > 0:
                lines.append(f"shr.b32 t, t, {shift};")
            elif shift < 0:
                lines.append(f"shl.b32 t, t, {-shift};")
            lines.append(f"lop3.b32 u, t, {mask:#x}, 0x43004300, 0xEA;")  # (t & mask) | 128.0
            lines.append("fma.rn.bf16x2 u, u, one, base;")
            lines.append(f"fma.rn.bf16x2 s, ${w + 1 + e}, f, nz;")
            lines.append(f"fma.rn.bf16x2 ${k * pack + e}, u, s, nz;")
    lines.append("}")
    return "\n".join(lines)


@triton.constexpr_function
def bf16x2_constraints(word_bits: int, bits: int) -> str:
    """The operand constraints of :func:`bf16x2_unpack_asm`."""
    pack = 4 if word_bits == 8 else 1
    return ",".join(["=r"] * (word_bits // bits // 2 * pack) + ["r"] * (1 + pack))


@triton.jit
def bf16_twice(x):
    """int32 holding bf16(x) in both halves."""
    h = x.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def unpack_bf16x2(word, scale, L: tl.constexpr):
    """The PER = WORD // BITS codes of each packed word ``word`` [R, G, W] (uint8 or int32) as
    bf16 values ``(code - OFFSET) * scale`` with a bf16 scale (``scale`` [R, G, 1] fp32 per
    block), two neighbouring codes an instruction (:func:`bf16x2_unpack_asm`): a tuple of PER
    tensors of the words' shape, in the codes' order."""
    PER: tl.constexpr = L.WORD // L.BITS
    pairs = tl.inline_asm_elementwise(
        bf16x2_unpack_asm(L.WORD, L.BITS, L.MSB, L.OFFSET), bf16x2_constraints(L.WORD, L.BITS),
        [word, tl.broadcast_to(bf16_twice(scale), word.shape)], dtype=(tl.int32,) * (PER // 2), is_pure=True,
        pack=4 if L.WORD == 8 else 1)
    vals = ()
    for k in tl.static_range(PER // 2):
        vals = vals + (_low(pairs[k]), _high(pairs[k]))
    return vals


@triton.jit
def _low(pair):
    """The bf16 in the low half of int32 ``pair``."""
    return (pair & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _high(pair):
    """The bf16 in the high half of int32 ``pair``."""
    return (pair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.constexpr_function
def table_fits(word_bits: int, bits: int) -> bool:
    """Whether :func:`table_unpack_asm` decodes this packing: codes of at most 2 bits (a block's
    values are a table of at most four) in 32-bit words."""
    return word_bits == 32 and bits <= 2


@triton.constexpr_function
def table_asm() -> str:
    """PTX of a block's table of four bf16 values from its four fp32 values $2..$5 (codes 0 to 3):
    $0 holds their low bytes (byte c: value c's), $1 their high bytes, so that a PRMT selector of
    nibbles c, 4 + c picks value c (``cvt.rn.bf16x2.f32 d, a, b`` puts a in d's high half)."""
    return "\n".join(["{", ".reg .b32 p, q;", "cvt.rn.bf16x2.f32 p, $3, $2;", "cvt.rn.bf16x2.f32 q, $5, $4;",
                      "prmt.b32 $0, p, q, 0x6420;", "prmt.b32 $1, p, q, 0x7531;", "}"])


@triton.constexpr_function
def _table_slots(bits: int, msb: bool) -> list:
    """Per output of :func:`table_unpack_asm`, in order: the in-byte bit offset of its two codes,
    whether they are those of bytes 2 and 3 (else 0 and 1), and the two codes' indices in the
    word (the low half's first)."""
    per = 32 // bits
    slots = []
    for offset in range(0, 8, bits):
        for upper in (False, True):
            at = [8 * byte + offset for byte in ((2, 3) if upper else (0, 1))]  # the codes' bit positions
            slots.append((offset, upper, *((per - 1 - p // bits) if msb else p // bits for p in at)))
    return slots


@triton.constexpr_function
def table_slot(bits: int, msb: bool, code: int) -> int:
    """Where :func:`table_unpack_asm` puts code ``code`` of a word: twice its output, plus one
    where the code is its high half."""
    slots = _table_slots(bits, msb)
    for k in range(len(slots)):
        if code in slots[k][2:]:
            return 2 * k + (code == slots[k][3])
    raise ValueError(f"no code {code} in a word of {bits}-bit codes")


@triton.constexpr_function
def table_unpack_asm(bits: int, msb: bool) -> str:
    """PTX that looks the codes of a 32-bit word up in their block's table (:func:`table_asm`),
    two codes a 32-bit result. Operands: the outputs (:func:`_table_slots`' order), then the word
    and the table's two registers. For each in-byte offset the word's codes there, one a byte, are
    shifted to bit 0 and masked (a code at bits 0, 8, 16 and 24); times 0x11 plus 0x40404040, the
    codes of bytes 0 and 1 become the selector nibbles c, 4 + c of the low 16 bits, those of bytes
    2 and 3 of the high 16 bits, and one PRMT each picks the two values' bytes: codes of a byte pair
    are 8 bits apart, not neighbours (:func:`table_slot` says which code lands where)."""
    code_mask = ((1 << bits) - 1) * 0x01010101
    slots = _table_slots(bits, msb)
    w = len(slots)  # the word operand, then the table
    lines = ["{", ".reg .b32 t, x, y;"]
    for k in range(0, len(slots), 2):
        offset = slots[k][0]
        if offset:
            lines.append(f"shr.b32 t, ${w}, {offset};")
            lines.append(f"and.b32 t, t, {code_mask:#x};")
        else:
            lines.append(f"and.b32 t, ${w}, {code_mask:#x};")
        lines.append("mad.lo.u32 x, t, 0x11, 0x40404040;")
        lines.append(f"prmt.b32 ${k}, ${w + 1}, ${w + 2}, x;")
        lines.append("shr.b32 y, x, 16;")
        lines.append(f"prmt.b32 ${k + 1}, ${w + 1}, ${w + 2}, y;")
    lines.append("}")
    return "\n".join(lines)


@triton.constexpr_function
def table_constraints(bits: int) -> str:
    """The operand constraints of :func:`table_unpack_asm`."""
    return ",".join(["=r"] * (16 // bits) + ["r"] * 3)


@triton.jit
def unpack_table(word, values, L: tl.constexpr):
    """The PER = 32 // BITS codes of each 32-bit word ``word`` [R, G, W] of codes of at most 2 bits
    as bf16 values, looked up in their block's table: ``values`` holds the fp32 values of codes
    0 to 3 of each block ([R, G, 1] each; see ``tile._unpack``), rounded once to bf16 here, so each
    value is what the fp32 decode gives it, rounded as it rounds it. A tuple of PER tensors of the
    words' shape, in the codes' order."""
    PER: tl.constexpr = 32 // L.BITS
    low, high = tl.inline_asm_elementwise(
        table_asm(), "=r,=r,r,r,r,r", [values[0].to(tl.int32, bitcast=True), values[1].to(tl.int32, bitcast=True),
                                    values[2].to(tl.int32, bitcast=True), values[3].to(tl.int32, bitcast=True)],
        dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    pairs = tl.inline_asm_elementwise(
        table_unpack_asm(L.BITS, L.MSB), table_constraints(L.BITS),
        [word, tl.broadcast_to(low, word.shape), tl.broadcast_to(high, word.shape)],
        dtype=(tl.int32,) * (PER // 2), is_pure=True, pack=1)
    vals = ()
    for i in tl.static_range(PER):
        if table_slot(L.BITS, L.MSB, i) % 2:
            vals = vals + (_high(pairs[table_slot(L.BITS, L.MSB, i) // 2]),)
        else:
            vals = vals + (_low(pairs[table_slot(L.BITS, L.MSB, i) // 2]),)
    return vals


@triton.jit
def add_bf16(a, b):
    """a + b for bf16 tensors of one shape, two values an instruction (GPU only: inline PTX)."""
    return tl.inline_asm_elementwise(
        "{\n.reg .b32 one;\nmov.b32 one, 0x3F803F80;\nfma.rn.bf16x2 $0, $1, one, $2;\n}", "=r,r,r", [a, b],
        dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def opaque_bf16(x):
    """x itself, through a move that Triton cannot see into and ptxas drops: a decoded tile that
    reaches Hopper's warpgroup MMA (64 query rows and more) straight from ``tile._spread``'s
    reshapes fails to compile in Triton 3.6 (its operand pass folds the reshapes into the shared
    layout: "Illegal shared layout")."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.bfloat16, is_pure=True, pack=2)
