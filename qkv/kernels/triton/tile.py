"""@triton.jit decoding of compressed tiles, shared by every kernel that reads codes.

:func:`decode_tile` turns a tile of tokens of one compressed tensor into fp32 values: the
dequantize kernel (quantize.py) calls it on its arguments, the attention kernels
(attention_kernel.py, decode_kernel.py) on span records. Its input is a :class:`Source`, the
tensor's pointers and sizes for one (batch, head) row, built by :func:`record_source` from a
record or by the dequantize kernel from its arguments; its layout ``L`` is a
:class:`qkv.kernels.triton.records.TensorLayout` passed whole as a constexpr.

Stages are one tuple, one entry a stage: (centroid rows, assignment row, assignment stride along
the tokens) of the (batch, head) row, built by :func:`record_source` or, from the ``stages``
kernel argument of the quantize and dequantize kernels, by :func:`stage_rows`; :func:`add_stages`
adds (or subtracts) them in stage order.

How values are computed is ``ARITH``: "exact" is the reference's arithmetic
(:func:`qkv.kernels.quantize.dequantize_torch`) in its order: fp32 ``(code - offset) * scale``,
``+ zero``, then each stage's centroid added in stage order, so a kernel compiled without FMA
contraction (dequantize) reproduces it bit for bit. The attention kernels, whose results are
compared within rounding anyway, take one fused multiply-add per packed code instead ("fma", fp32),
and on the GPU with bf16 operands decode packed codes straight to bf16 by inline PTX, two values
an instruction chain ("bf16x2", :func:`arith`; :mod:`qkv.kernels.triton.ptx_codes`): the
per-element work is what bounds them at few queries.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from qkv.kernels.triton.bits import hadamard_rows, unpack_code
from qkv.kernels.triton.ptx_codes import add_bf16, bf16x2_fits, opaque_bf16, table_fits, unpack_bf16x2, unpack_table
from qkv.kernels.triton.records import TENSOR_FIELDS, offsets

_T = offsets(TENSOR_FIELDS)
F_CODES = tl.constexpr(_T["codes"])
F_SCALES = tl.constexpr(_T["scales"])
F_ZEROS = tl.constexpr(_T["zeros"])
F_MULT = tl.constexpr(_T["mult"])
F_FP = tl.constexpr(_T["fp"])
F_QUANTIZED = tl.constexpr(_T["quantized"])
F_WORDS = tl.constexpr(_T["words"])
F_GROUPS = tl.constexpr(_T["groups"])
F_FP_LEN = tl.constexpr(_T["fp_len"])
F_C = tl.constexpr(_T["c0"])  # stage i's centroid rows at F_C + i, their stride at F_C_STRIDE + i
F_C_STRIDE = tl.constexpr(_T["c_stride0"])
F_A = tl.constexpr(_T["a0"])
F_A_STRIDE = tl.constexpr(_T["a_stride0"])


class Source(NamedTuple):
    """One compressed tensor's data for one (batch, head) row: pointers to its first packed row,
    scale row, zero-point row and full-precision token (each unread where the layout has none);
    its row multiplier ``m``; its quantized tokens, words per packed row, blocks per scale row;
    its stages (see :func:`add_stages`)."""

    codes: object
    scales: object
    zeros: object
    m: object
    fp: object
    quantized: object
    words: object
    groups: object
    stages: tuple


@triton.jit
def stage_rows(stages, n):
    """The stages of (batch, head) row ``n`` from the kernel argument ``stages``: per stage
    (centroids [N, C, D] contiguous, assignments [N, S], their strides along N, the assignments'
    along S)."""
    rows = ()
    for i in tl.static_range(len(stages)):
        c, a, c_n, a_n, a_s = stages[i]
        rows = rows + ((c + n * c_n, a + n * a_n, a_s),)
    return rows


@triton.jit
def add_stages(x, stages, tok, tok_ok, ch, mask, D, TOKEN_ROWS: tl.constexpr, SUBTRACT: tl.constexpr):
    """x plus (SUBTRACT: minus) each stage's centroid value under every element, stage by stage
    in fp32. x's rows are tokens ``tok`` and its columns channels ``ch`` (TOKEN_ROWS), or the
    other way round; ``tok_ok``: the tokens that exist, ``mask``: the elements."""
    for i in tl.static_range(len(stages)):
        c, a, a_s = stages[i]
        row = tl.load(a + tok * a_s, mask=tok_ok, other=0).to(tl.int32) * D  # int32: C * D < 2**31
        if TOKEN_ROWS:
            off = row[:, None] + ch[None, :]
        else:
            off = row[None, :] + ch[:, None]
        cent = tl.load(c + off, mask=mask, other=0.0).to(tl.float32)
        if SUBTRACT:
            x = x - cent
        else:
            x = x + cent
    return x


@triton.jit
def record_source(rec, n, D: tl.constexpr, L: tl.constexpr, FP_T: tl.constexpr):
    """The :class:`Source` of (batch, head) row ``n`` of the compressed tensor whose record (field
    order: TENSOR_FIELDS) is at ``rec``. L.VEC: the host checked that every base address and row
    stride is a multiple of 16 bytes, so the hints let tiles load as vectors."""
    quantized = tl.load(rec + F_QUANTIZED).to(tl.int32)
    words = tl.load(rec + F_WORDS).to(tl.int32)
    groups = tl.load(rec + F_GROUPS).to(tl.int32)
    fp_len = tl.load(rec + F_FP_LEN)
    if L.TOKEN_AXIS:
        rows = n * quantized
    else:
        rows = n * D
    codes = tl.load(rec + F_CODES).to(tl.pointer_type(L.CODE_T)) + rows * words
    scales = tl.load(rec + F_SCALES).to(tl.pointer_type(L.SCALE_T)) + rows * groups
    zeros = tl.load(rec + F_ZEROS).to(tl.pointer_type(L.SCALE_T)) + rows * groups
    m = 1.0
    if L.HAS_MULT:
        m = tl.load(tl.load(rec + F_MULT).to(tl.pointer_type(tl.float32)) + n)
    fp = tl.load(rec + F_FP).to(tl.pointer_type(FP_T)) + n * fp_len * D
    # fields read through L are plain Python values: bound as constexprs where Triton wants them
    WORDS_MULT: tl.constexpr = L.WORDS_MULT
    STAGES: tl.constexpr = L.STAGES
    if L.VEC:
        words = tl.multiple_of(words, WORDS_MULT)
        codes = tl.multiple_of(codes, 16)
        fp = tl.multiple_of(fp, 16)
    stages = ()
    for i in tl.static_range(STAGES):
        c = tl.load(rec + F_C + i).to(tl.pointer_type(L.CENT_T)) + n * tl.load(rec + F_C_STRIDE + i)
        a = tl.load(rec + F_A + i).to(tl.pointer_type(L.A_T[i])) + n * tl.load(rec + F_A_STRIDE + i)
        if L.VEC:
            c = tl.multiple_of(c, 16)
            a = tl.multiple_of(a, 16)
        stages = stages + ((c, a, 1),)
    return Source(codes, scales, zeros, m, fp, quantized, words, groups, stages)


@triton.jit
def _block_params(src, idx, mask, HAS_ZERO: tl.constexpr):
    """fp32 scales and zero points (scales again when there are none) of the blocks at ``idx``."""
    scale = tl.load(src.scales + idx, mask=mask, other=0.0).to(tl.float32) * src.m
    zero = scale
    if HAS_ZERO:
        zero = tl.load(src.zeros + idx, mask=mask, other=0.0).to(tl.float32) * src.m
    return scale, zero


@triton.jit
def _spread(parts, PER: tl.constexpr):
    """[R, C * PER] from a tuple of PER tensors [R, ...] of C elements a row (part j of element
    c at column c * PER + j): pairs are joined into a trailing axis that each thread holds, so the
    final reshape moves no data (PER a power of two)."""
    x = parts
    for _ in tl.static_range(5):  # up to 32 codes per word
        if len(x) > 1:
            joined = ()
            for i in tl.static_range(len(x) // 2):
                joined = joined + (tl.join(x[i], x[i + len(x) // 2]),)
            x = joined
    out = x[0]
    return tl.reshape(out, (out.shape[0], out.numel // out.shape[0]))


@triton.jit
def _unpack(word, scale, zero, L: tl.constexpr, EXACT: tl.constexpr):
    """Values [R, G * W * PER] fp32 of packed words ``word`` [R, G, W] whose codes share a block
    per (row, g): ``scale`` and ``zero`` [R, G, 1]. Each code is decoded in the words' own layout
    and the codes are spread along the row by :func:`_spread`. A code becomes a float without an
    int -> float conversion (a quarter-rate instruction): as mantissa bits of 2.0 it reads
    ``2 + code * 2**(AT - 22)`` (``raw``, the code at bit AT), then :func:`_affine`. EXACT leaves
    a code where it lies in its word where :func:`_in_place` allows (all but the lowest code of a
    byte word): the word is put under the exponent once, and each such code is one mask of it
    that keeps the exponent and the code's bits, no shift; the fused path puts a code at the
    mantissa's top (AT = 23 - BITS: one factor a block for every code)."""
    PER: tl.constexpr = L.WORD // L.BITS
    w32 = word.to(tl.int32)
    under = w32 | 0x40000000  # a bit 30 of the word is the exponent's own
    vals = ()
    for j in tl.static_range(PER):
        vals = vals + (_code_value(w32, under, scale, zero, _code_bit(j, PER, L.BITS, L.MSB), L, EXACT),)
    return _spread(vals, PER)


@triton.jit
def _code_value(w32, under, scale, zero, AT: tl.constexpr, L: tl.constexpr, EXACT: tl.constexpr):
    """The values of the codes at bit AT of words ``w32`` (``under``: the words under the exponent
    of 2.0), see :func:`_unpack`."""
    if EXACT and _in_place(AT, L.BITS, L.OFFSET):
        raw = (under & (0x40000000 | (((1 << L.BITS) - 1) << AT))).to(tl.float32, bitcast=True)
        return _affine(raw, scale, zero, AT, L, True)
    code = (w32 >> AT) & ((1 << L.BITS) - 1)
    return _affine(_raw(code << (23 - L.BITS)), scale, zero, 23 - L.BITS, L, EXACT)


@triton.constexpr_function
def _code_bit(j: int, per: int, bits: int, msb: bool) -> int:
    """The lowest bit of code j of a word of ``per`` codes of ``bits`` bits (first code at the top
    if ``msb``)."""
    return (per - 1 - j) * bits if msb else j * bits


@triton.constexpr_function
def _in_place(at: int, bits: int, offset: float) -> bool:
    """Whether a code at bit ``at`` of its word decodes there (:func:`_affine`, exact): it lies in
    the mantissa below bit 23, and 2**(23 - at) + offset is a float (its ulp, 2**-at, divides the
    offset: a half-integer offset needs at >= 1)."""
    return at <= 23 - bits and (offset * 2**at) % 1 == 0


@triton.jit
def _raw(bits):
    """int32 mantissa bits (a code shifted to bit AT, nothing above bit 22) under the exponent of
    2.0: ``2 + code * 2**(AT - 22)`` (fp32)."""
    return (bits | 0x40000000).to(tl.float32, bitcast=True)


@triton.jit
def _affine(raw, scale, zero, AT: tl.constexpr, L: tl.constexpr, EXACT: tl.constexpr):
    """Values of codes given as ``raw`` (see :func:`_unpack`; the code at bit AT) with their blocks'
    ``scale`` and ``zero`` (broadcast to raw). EXACT: the reference's order, ``(code - OFFSET) *
    scale + zero`` (raw times 2**(22 - AT) minus (2**(23 - AT) + OFFSET) is exact, fused or not);
    otherwise one fused multiply-add per value, raw * (scale * 2**(22 - AT)) + (zero - scale *
    (2**(23 - AT) + OFFSET)), with the two factors computed per block (within fp32 rounding of the
    reference)."""
    if EXACT:  # the first step as one fused multiply-add, exact as it stands
        val = tl.fma(raw, float(1 << (22 - AT)), -float((1 << (23 - AT)) + L.OFFSET)) * scale
        if L.HAS_ZERO:
            val = val + zero
    else:
        bias = scale * -((1 << (23 - AT)) + L.OFFSET)
        if L.HAS_ZERO:
            bias = bias + zero
        val = raw * (scale * (1 << (22 - AT))) + bias
    return val


@triton.constexpr_function
def arith(dot_bf16: bool, emulate: bool) -> str:
    """The decode kernel's ``ARITH`` for :func:`decode_tile`: "bf16x2" where the products take bf16
    operands on the GPU, else "fma" (the interpreter runs no PTX)."""
    return "bf16x2" if dot_bf16 and not emulate else "fma"


@triton.jit
def _unpack_as(word, scale, zero, L: tl.constexpr, ARITH: tl.constexpr):
    """:func:`_unpack` (fp32) or, for ARITH "bf16x2", bf16 values decoded by inline PTX
    (:mod:`qkv.kernels.triton.ptx_codes`): codes without zero points where
    :func:`~qkv.kernels.triton.ptx_codes.bf16x2_fits` (a bf16 scale, each value rounded once
    from it), else codes of at most 2 bits in 32-bit words where
    :func:`~qkv.kernels.triton.ptx_codes.table_fits` (each value the fp32 decode's, rounded once),
    spread as in :func:`_unpack` and kept opaque (:func:`~qkv.kernels.triton.ptx_codes.opaque_bf16`)."""
    PER: tl.constexpr = L.WORD // L.BITS
    if ARITH == "bf16x2" and not L.HAS_ZERO and bf16x2_fits(L.WORD, L.BITS, L.MSB, L.OFFSET):
        x = opaque_bf16(_spread(unpack_bf16x2(word, scale, L), PER))
    elif ARITH == "bf16x2" and table_fits(L.WORD, L.BITS):
        table = ()
        for c in tl.static_range(4):  # each block's values of codes 0 to 3, as _unpack computes them
            table = table + (_affine(_raw(tl.full(scale.shape, c << (23 - L.BITS), tl.int32)), scale, zero,
                                     23 - L.BITS, L, False),)
        x = opaque_bf16(_spread(unpack_table(word, table, L), PER))
    else:
        x = _unpack(word, scale, zero, L, ARITH == "exact")
    return x


@triton.jit
def _stage_sum(stages, tok, tok_ok, ch, ch_ok, D):
    """The sum of every stage's centroid value under the elements of a [tokens, channels] tile:
    the first stage's in its own dtype, more summed in fp32. A token past ``tok_ok`` takes
    centroid 0's values (its assignment is not read; every stage has a centroid 0), so the
    gathers are masked by channel only (``ch_ok``; None: every channel)."""
    total = _centroids_under(stages[0], tok, tok_ok, ch, ch_ok, D)
    for i in tl.static_range(1, len(stages)):
        total = total.to(tl.float32) + _centroids_under(stages[i], tok, tok_ok, ch, ch_ok, D).to(tl.float32)
    return total


@triton.jit
def _centroids_under(stage, tok, tok_ok, ch, ch_ok, D):
    """One stage's centroid values under a [tokens, channels] tile (see :func:`_stage_sum`)."""
    c, a, a_s = stage
    row = tl.load(a + tok * a_s, mask=tok_ok, other=0).to(tl.int32) * D  # int32: C * D < 2**31
    if ch_ok is None:
        out = tl.load(c + row[:, None] + ch[None, :])
    else:
        out = tl.load(c + row[:, None] + ch[None, :], mask=ch_ok, other=0.0)
    return out


@triton.jit
def fp_rows_rotated(x, src, t0, D: tl.constexpr, BLOCK_N: tl.constexpr, EMULATE: tl.constexpr):
    """A decoded tile ``x`` [BLOCK_N, D] of tokens t0 .. t0 + BLOCK_N of a Hadamard-rotated tensor
    (``src``), fp32, with its full-precision tokens, stored unrotated, taken into the tensor's
    stored basis (``bits.hadamard_rows``): what the attention kernels read with rotated queries."""
    return hadamard_rows(x, (t0 + tl.arange(0, BLOCK_N)) >= src.quantized, D, EMULATE)


@triton.jit
def decode_tile(src, t0, S, L: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_FP: tl.constexpr, ARITH: tl.constexpr, RUNS: tl.constexpr):
    """Decoded values [BLOCK_N, BLOCK_D] of tokens t0 .. t0 + BLOCK_N (t0 a multiple of BLOCK_N) of
    the compressed tensor ``src`` (:class:`Source`) of layout ``L``: the reference's values before
    their rounding to the output dtype, 0 past D and at tokens it does not hold. HAS_FP: the tile
    may reach the full-precision tokens kept after the quantized ones, up to S (the attention
    kernels decode only a span's last tiles so: a runtime branch in their main tile loop made
    ptxas 13.4 serialize the tensor-core products of the whole kernel). ARITH: "exact", the
    reference's arithmetic order in fp32 (dequantize); "fma", fp32 with a fused multiply-add per
    value for packed codes (see :func:`_affine`); "bf16x2" (attention with bf16 operands on the
    GPU), bf16 values: packed codes decoded by inline PTX where :func:`_unpack_as` can, the
    stages' centroids (summed in fp32 if more than one) added in bf16, so each value is rounded to
    bf16 twice where the reference rounds it once.

    RUNS (packed codes on the fast path): the tile's part of each packed row (a token's on the
    per-token path, a channel's on the per-channel one) is loaded as one run of words, so that a
    thread holds runs of several rows; else as [rows, blocks, words], a row's words a thread. A
    tile that reaches its product through shared memory (the values of P @ V, per-channel keys)
    is then stored there as vectors: with one row a thread Triton 3.6 puts the rows fastest in
    shared memory (``getOrderForMemory``: one element a thread along them) and stores the values
    16 bits at a time. Per-token keys, which the product of q @ k^T reads from registers, take
    fewer instructions without runs (``benchmarks/decode_sass.py``; docs/attention.md)."""
    BF16: tl.constexpr = ARITH == "bf16x2"
    tok = t0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    q_ok = tok < src.quantized
    ok = q_ok[:, None]
    if BLOCK_D > D:
        ok = ok & (d < D)[None, :]
    if L.CAST:  # float-cast spans store the values themselves
        x = tl.load(src.codes + tok[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
    elif L.FAST:  # whole codes per word, a block's codes in whole words (D == BLOCK_D): see code_layout
        PER: tl.constexpr = L.WORD // L.BITS
        if L.TOKEN_AXIS:  # per-token blocks: a packed row per token, [tokens, blocks, words of a block]
            G: tl.constexpr = D // L.QBLOCK
            WG: tl.constexpr = L.QBLOCK // PER
            g = tl.arange(0, G)
            if RUNS:
                run = tl.arange(0, G * WG)
                word = tl.load(src.codes + tok[:, None] * src.words + run[None, :], mask=q_ok[:, None], other=0)
                word = tl.reshape(word, (BLOCK_N, G, WG))
            else:
                w = g[None, :, None] * WG + tl.arange(0, WG)[None, None, :]
                word = tl.load(src.codes + tok[:, None, None] * src.words + w, mask=q_ok[:, None, None], other=0)
            scale, zero = _block_params(src, tok[:, None] * src.groups + g[None, :], ok, L.HAS_ZERO)
            x = _unpack_as(word, scale[:, :, None], zero[:, :, None], L, ARITH)
        else:  # per-channel blocks along the tokens: a packed row per channel, [channels, blocks, words]
            GT: tl.constexpr = BLOCK_N // L.QBLOCK if BLOCK_N > L.QBLOCK else 1
            WG: tl.constexpr = BLOCK_N // PER // GT
            g = t0 // L.QBLOCK + tl.arange(0, GT)  # the tile's blocks (t0 is a multiple of PER)
            if RUNS:
                run = tl.multiple_of(t0 // PER, GT * WG) + tl.arange(0, GT * WG)
                word = tl.load(src.codes + d[:, None] * src.words + run[None, :],
                               mask=(run * PER < src.quantized)[None, :], other=0)
                word = tl.reshape(word, (D, GT, WG))
            else:
                w = t0 // PER + tl.arange(0, GT)[None, :, None] * WG + tl.arange(0, WG)[None, None, :]
                word = tl.load(src.codes + d[:, None, None] * src.words + w, mask=w * PER < src.quantized, other=0)
            scale, zero = _block_params(src, d[:, None] * src.groups + g[None, :],
                                        (g * L.QBLOCK < src.quantized)[None, :], L.HAS_ZERO)
            x = tl.trans(_unpack_as(word, scale[:, :, None], zero[:, :, None], L, ARITH))
    else:  # any other layout (codes across words, D or blocks not powers of two): code by code
        if L.TOKEN_AXIS:
            row = tok[:, None] + 0 * d[None, :]
            col = d[None, :] + 0 * tok[:, None]
        else:
            row = d[None, :] + 0 * tok[:, None]
            col = tok[:, None] + 0 * d[None, :]
        code = unpack_code(src.codes + row * src.words, col, ok, L.BITS, L.WORD, L.MSB)
        scale, zero = _block_params(src, row * src.groups + col // L.QBLOCK, ok, L.HAS_ZERO)
        x = (code.to(tl.float32) - L.OFFSET) * scale
        if L.HAS_ZERO:
            x = x + zero
    if BF16:
        x = x.to(tl.bfloat16)  # the packed path's values already are
        if len(src.stages) > 0:
            ch_ok = None
            if BLOCK_D > D:
                ch_ok = (d < D)[None, :]
            x = add_bf16(x, _stage_sum(src.stages, tok, q_ok, d, ch_ok, D).to(tl.bfloat16))
    else:
        x = add_stages(x, src.stages, tok, q_ok, d, ok, D, True, False)
    if HAS_FP:
        f_ok = (tok >= src.quantized) & (tok < S)
        xf = tl.load(src.fp + (tok - src.quantized)[:, None] * D + d[None, :], mask=f_ok[:, None], other=0.0)
        x = tl.where(f_ok[:, None], xf.to(x.dtype), x)
    return x
