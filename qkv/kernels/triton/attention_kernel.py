"""The @triton.jit code of the attention over compressed spans (host side: attention.py).

``attention_kernel`` runs, for a block of queries of one (batch, head), a FlashAttention-style loop
(online softmax in the log2 domain, fp32 accumulators, tensor-core products in the queries' dtype)
over every compressed span of a table (decoding each key and value tile in registers right before
its product) and then over every full-precision segment of a second table. Field offsets in the
tables are read by name: the ``F_*`` / ``S_*`` / ``DN_*`` constants below are built from the field tables of
records.py (``TENSOR_FIELDS`` / ``SPAN_FIELDS`` / ``DENSE_FIELDS``), which the host fills.
"""

import triton
import triton.language as tl

from qkv.kernels.triton.bits import round_to_bf16, unpack_code
from qkv.kernels.triton.records import DENSE_FIELDS, SPAN_FIELDS, TENSOR_FIELDS, offsets

_T = offsets(TENSOR_FIELDS)
_S = offsets(SPAN_FIELDS)
_DN = offsets(DENSE_FIELDS)
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
S_LEN = tl.constexpr(len(SPAN_FIELDS))
S_TOKENS = tl.constexpr(_S["tokens"])
S_SKIP = tl.constexpr(_S["skip"])
S_K = tl.constexpr(_S["k.codes"])  # the key record starts here
S_V = tl.constexpr(_S["v.codes"])
DN_LEN = tl.constexpr(len(DENSE_FIELDS))
DN_K = tl.constexpr(_DN["k"])
DN_V = tl.constexpr(_DN["v"])
DN_TOKENS = tl.constexpr(_DN["tokens"])
DN_K_STRIDE = tl.constexpr(_DN["k_stride_b"])  # b, h, s strides follow
DN_V_STRIDE = tl.constexpr(_DN["v_stride_b"])


@triton.jit
def _as_dot(x, DOT_BF16: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 tile -> the tensor-core operand: bf16/fp16, or (EMULATE) fp32 holding those values.
    fp16 saturates at 65504 (qkv.dtypes.saturate: a reconstruction may overshoot its input)."""
    if not DOT_BF16:
        x = tl.minimum(tl.maximum(x, -65504.0), 65504.0)
    if EMULATE:
        if DOT_BF16:
            out = round_to_bf16(x)  # the interpreter's own conversion truncates
        else:
            out = x.to(tl.float16).to(tl.float32)
    else:
        if DOT_BF16:
            out = x.to(tl.bfloat16)
        else:
            out = x.to(tl.float16)
    return out


@triton.jit
def _dot(a, b, EMULATE: tl.constexpr):
    """a @ b in fp32 (see _mma)."""
    if EMULATE:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _mma(a, b, acc, EMULATE: tl.constexpr):
    """acc + a @ b with fp32 accumulation (IEEE fp32 products of the same values when EMULATE:
    Triton's interpreter has no bf16 dot)."""
    if EMULATE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _tensor_fields(rec, n, D: tl.constexpr, TOKEN_AXIS: tl.constexpr, HAS_MULT: tl.constexpr,
                   CODE_T: tl.constexpr, SCALE_T: tl.constexpr, FP_T: tl.constexpr, CENT_T: tl.constexpr,
                   A0_T: tl.constexpr, A1_T: tl.constexpr, A2_T: tl.constexpr, A3_T: tl.constexpr,
                   VEC: tl.constexpr, WORDS_MULT: tl.constexpr):
    """Base pointers for (batch, head) row ``n`` and sizes of one compressed tensor, read from its
    record in the span table (field order: TENSOR_FIELDS). VEC: the host checked that every base
    address and row stride is a multiple of 16 bytes, so the hints let tiles load as vectors."""
    quantized = tl.load(rec + F_QUANTIZED).to(tl.int32)
    words = tl.load(rec + F_WORDS).to(tl.int32)
    groups = tl.load(rec + F_GROUPS).to(tl.int32)
    fp_len = tl.load(rec + F_FP_LEN)
    if TOKEN_AXIS:
        rows = n * quantized
    else:
        rows = n * D
    codes = tl.load(rec + F_CODES).to(tl.pointer_type(CODE_T)) + rows * words
    scales = tl.load(rec + F_SCALES).to(tl.pointer_type(SCALE_T)) + rows * groups
    zeros = tl.load(rec + F_ZEROS).to(tl.pointer_type(SCALE_T)) + rows * groups
    m = 1.0
    if HAS_MULT:
        m = tl.load(tl.load(rec + F_MULT).to(tl.pointer_type(tl.float32)) + n)
    fp = tl.load(rec + F_FP).to(tl.pointer_type(FP_T)) + n * fp_len * D
    c0 = tl.load(rec + F_C).to(tl.pointer_type(CENT_T)) + n * tl.load(rec + F_C_STRIDE)
    c1 = tl.load(rec + F_C + 1).to(tl.pointer_type(CENT_T)) + n * tl.load(rec + F_C_STRIDE + 1)
    c2 = tl.load(rec + F_C + 2).to(tl.pointer_type(CENT_T)) + n * tl.load(rec + F_C_STRIDE + 2)
    c3 = tl.load(rec + F_C + 3).to(tl.pointer_type(CENT_T)) + n * tl.load(rec + F_C_STRIDE + 3)
    a0 = tl.load(rec + F_A).to(tl.pointer_type(A0_T)) + n * tl.load(rec + F_A_STRIDE)
    a1 = tl.load(rec + F_A + 1).to(tl.pointer_type(A1_T)) + n * tl.load(rec + F_A_STRIDE + 1)
    a2 = tl.load(rec + F_A + 2).to(tl.pointer_type(A2_T)) + n * tl.load(rec + F_A_STRIDE + 2)
    a3 = tl.load(rec + F_A + 3).to(tl.pointer_type(A3_T)) + n * tl.load(rec + F_A_STRIDE + 3)
    if VEC:
        words = tl.multiple_of(words, WORDS_MULT)
        codes = tl.multiple_of(codes, 16)
        fp = tl.multiple_of(fp, 16)
        c0 = tl.multiple_of(c0, 16)
        c1 = tl.multiple_of(c1, 16)
        c2 = tl.multiple_of(c2, 16)
        c3 = tl.multiple_of(c3, 16)
        a0 = tl.multiple_of(a0, 16)
        a1 = tl.multiple_of(a1, 16)
        a2 = tl.multiple_of(a2, 16)
        a3 = tl.multiple_of(a3, 16)
    return codes, scales, zeros, m, fp, quantized, words, groups, c0, c1, c2, c3, a0, a1, a2, a3


@triton.jit
def _add_stage(x, c, a, tok, ok, d, D: tl.constexpr):
    """x [BLOCK_N, D] + each token's centroid row of one smoothing stage."""
    idx = tl.load(a + tok, mask=ok, other=0).to(tl.int32)
    return x + tl.load(c + idx[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _code_values(word, shift, BITS: tl.constexpr):
    """The codes of packed words [R, W] (int32), code j of a word at bit ``shift[j]``, as floats
    [R, W, PER] without an int -> float conversion (a quarter-rate instruction): with the code as the
    top mantissa bits of 2.0, each value is 2 + code * 2**(1 - BITS) (see _affine)."""
    code = (word[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    return ((code << (23 - BITS)) | 0x40000000).to(tl.float32, bitcast=True)


@triton.jit
def _affine(scales, zeros, sidx, mask, m, BITS: tl.constexpr, OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr):
    """(mult, bias) of the blocks at ``sidx`` such that one fused multiply-add of a _code_values
    value gives its decoded value: (code - OFFSET) * scale (+ zero) =
    val * (scale * 2**(BITS - 1)) - (2**BITS + OFFSET) * scale (+ zero)."""
    scale = tl.load(scales + sidx, mask=mask, other=0.0).to(tl.float32) * m
    bias = -((1 << BITS) + OFFSET) * scale
    if HAS_ZERO:
        bias += tl.load(zeros + sidx, mask=mask, other=0.0).to(tl.float32) * m
    return scale * (1 << (BITS - 1)), bias


@triton.jit
def _span_tile(fields, t0, S, D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAST: tl.constexpr, BITS: tl.constexpr, QBLOCK: tl.constexpr, OFFSET: tl.constexpr,
               HAS_ZERO: tl.constexpr, TOKEN_AXIS: tl.constexpr, FAST: tl.constexpr, WORD: tl.constexpr,
               MSB: tl.constexpr, STAGES: tl.constexpr, HAS_FP: tl.constexpr):
    """Decoded values [BLOCK_N, D] fp32 of tokens t0 .. t0 + BLOCK_N of one compressed tensor
    (the reference's decompressed values before their rounding to the output dtype); ``fields``:
    its pointers and sizes (_tensor_fields). HAS_FP: the tile may reach the full-precision tokens
    kept after the quantized ones (only the span's last tiles are decoded so: a runtime branch in
    the main tile loop made ptxas 13.4 serialize the tensor-core products of the whole kernel)."""
    codes, scales, zeros, m, fp, quantized, words, groups, c0, c1, c2, c3, a0, a1, a2, a3 = fields
    tok = t0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    q_ok = tok < quantized
    if CAST:  # float-cast spans store the values themselves
        x = tl.load(codes + tok[:, None] * D + d[None, :], mask=q_ok[:, None], other=0.0).to(tl.float32)
    elif FAST:
        # whole codes per word: load the packed rows coalesced and expand each word by shifts
        PER: tl.constexpr = WORD // BITS
        j = tl.arange(0, PER)
        if MSB:
            shift = (PER - 1 - j) * BITS
        else:
            shift = j * BITS
        if TOKEN_AXIS:  # per-token blocks: a packed row per token
            w = tl.arange(0, D // PER)
            word = tl.load(codes + tok[:, None] * words + w[None, :], mask=q_ok[:, None], other=0)
            val = tl.reshape(_code_values(word.to(tl.int32), shift, BITS), (BLOCK_N, D // QBLOCK, QBLOCK))
            g = tl.arange(0, D // QBLOCK)
            mult, bias = _affine(scales, zeros, tok[:, None] * groups + g[None, :], q_ok[:, None], m,
                                 BITS, OFFSET, HAS_ZERO)
            x = tl.reshape(val * mult[:, :, None] + bias[:, :, None], (BLOCK_N, D))
        else:  # per-channel blocks along the tokens: a packed row per channel (t0 is a multiple of PER)
            w = t0 // PER + tl.arange(0, BLOCK_N // PER)
            word = tl.load(codes + d[:, None] * words + w[None, :], mask=(w * PER < quantized)[None, :], other=0)
            val = tl.reshape(_code_values(word.to(tl.int32), shift, BITS), (D, BLOCK_N))
            if BLOCK_N % QBLOCK == 0:  # whole scale blocks per tile (t0 is a multiple of BLOCK_N)
                G: tl.constexpr = BLOCK_N // QBLOCK
                g = t0 // QBLOCK + tl.arange(0, G)
                mult, bias = _affine(scales, zeros, d[:, None] * groups + g[None, :], (g * QBLOCK < quantized)[None, :],
                                     m, BITS, OFFSET, HAS_ZERO)
                val = tl.reshape(tl.reshape(val, (D, G, QBLOCK)) * mult[:, :, None] + bias[:, :, None], (D, BLOCK_N))
            else:  # a scale per code
                mult, bias = _affine(scales, zeros, d[:, None] * groups + (tok // QBLOCK)[None, :], q_ok[None, :],
                                     m, BITS, OFFSET, HAS_ZERO)
                val = val * mult + bias
            x = tl.trans(val)
    else:
        mask = q_ok[:, None] & (d < D)[None, :]
        if TOKEN_AXIS:
            row = tok[:, None] + 0 * d[None, :]
            col = d[None, :] + 0 * tok[:, None]
        else:
            row = d[None, :] + 0 * tok[:, None]
            col = tok[:, None] + 0 * d[None, :]
        code = unpack_code(codes + row * words, col, mask, BITS, WORD, MSB)
        sidx = row * groups + col // QBLOCK
        x = (code.to(tl.float32) - OFFSET) * (tl.load(scales + sidx, mask=mask, other=0.0).to(tl.float32) * m)
        if HAS_ZERO:
            x += tl.load(zeros + sidx, mask=mask, other=0.0).to(tl.float32) * m
    if STAGES > 0:
        x = _add_stage(x, c0, a0, tok, q_ok, d, D)
    if STAGES > 1:
        x = _add_stage(x, c1, a1, tok, q_ok, d, D)
    if STAGES > 2:
        x = _add_stage(x, c2, a2, tok, q_ok, d, D)
    if STAGES > 3:
        x = _add_stage(x, c3, a3, tok, q_ok, d, D)
    if HAS_FP:
        f_ok = (tok >= quantized) & (tok < S)
        xf = tl.load(fp + (tok - quantized)[:, None] * D + d[None, :], mask=f_ok[:, None], other=0.0)
        x = tl.where(f_ok[:, None], xf.to(tl.float32), x)
    return x


@triton.jit
def _scores(q, q_lo, k, SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """q @ k^T [BLOCK_M, BLOCK_N] fp32 for a key tile k [BLOCK_N, D]; SPLIT: the queries are
    q + q_lo (an fp32 query in two tensor-core operands)."""
    s = _dot(q, tl.trans(k), EMULATE)
    if SPLIT:
        s = _mma(q_lo, tl.trans(k), s, EMULATE)
    return s


@triton.jit
def _softmax_update(s, m_i, l_i, t_ok, partial, qk_scale):
    """Online-softmax update (log2 domain) for scores s: (p fp32, alpha, new max, new sum); the
    caller adds p @ v to acc * alpha. ``partial``: the tile holds keys outside the segment (masked
    by t_ok)."""
    if partial:
        s = tl.where(t_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _span_tiles(q, q_lo, m_i, l_i, acc, lo, hi, skip, S, qk_scale, kt, vt,
                D: tl.constexpr, BLOCK_N: tl.constexpr, PIPE: tl.constexpr, SPLIT_Q: tl.constexpr,
                DOT_BF16: tl.constexpr, EMULATE: tl.constexpr,
                K_CAST: tl.constexpr, K_BITS: tl.constexpr, K_QBLOCK: tl.constexpr, K_OFFSET: tl.constexpr,
                K_HAS_ZERO: tl.constexpr, K_TOKEN_AXIS: tl.constexpr, K_FAST: tl.constexpr, K_WORD: tl.constexpr,
                K_MSB: tl.constexpr, K_STAGES: tl.constexpr, K_HAS_FP: tl.constexpr,
                V_CAST: tl.constexpr, V_BITS: tl.constexpr, V_QBLOCK: tl.constexpr, V_OFFSET: tl.constexpr,
                V_HAS_ZERO: tl.constexpr, V_TOKEN_AXIS: tl.constexpr, V_FAST: tl.constexpr, V_WORD: tl.constexpr,
                V_MSB: tl.constexpr, V_STAGES: tl.constexpr, V_HAS_FP: tl.constexpr):
    """The online softmax over the key tiles lo .. hi (multiples of BLOCK_N) of one span whose key
    and value fields (_tensor_fields' order) are ``kt`` and ``vt``: (m_i, l_i, acc). PIPE: the
    software-pipelining depth of the loop."""
    for t0 in tl.range(lo, hi, BLOCK_N, num_stages=PIPE):
        k = _span_tile(kt, t0, S, D, BLOCK_N, K_CAST, K_BITS, K_QBLOCK, K_OFFSET, K_HAS_ZERO,
                       K_TOKEN_AXIS, K_FAST, K_WORD, K_MSB, K_STAGES, K_HAS_FP)
        tok = t0 + tl.arange(0, BLOCK_N)
        t_ok = (tok >= skip) & (tok < S)
        # issue q @ k^T, decode the value tile while the tensor cores work, then the softmax
        s = _scores(q, q_lo, _as_dot(k, DOT_BF16, EMULATE), SPLIT_Q, EMULATE)
        v = _span_tile(vt, t0, S, D, BLOCK_N, V_CAST, V_BITS, V_QBLOCK, V_OFFSET, V_HAS_ZERO,
                       V_TOKEN_AXIS, V_FAST, V_WORD, V_MSB, V_STAGES, V_HAS_FP)
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, t_ok, (t0 < skip) | (t0 + BLOCK_N > S), qk_scale)
        acc = _mma(_as_dot(p, DOT_BF16, EMULATE), _as_dot(v, DOT_BF16, EMULATE), acc * alpha[:, None], EMULATE)
    return m_i, l_i, acc


@triton.jit
def attention_kernel(
    q_ptr, ql_ptr, out_ptr, lse_ptr, dense_ptr, span_ptr,
    n_dense, n_spans, H, HKV, SQ,
    q_sb, q_sh, q_ss, o_sb, o_sh, o_ss, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPAN_STAGES: tl.constexpr, DENSE_STAGES: tl.constexpr, SPLIT_Q: tl.constexpr,
    KV_T: tl.constexpr, DENSE_MULT: tl.constexpr, DOT_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
    EMULATE: tl.constexpr, HAS_SPANS: tl.constexpr, WRITE_LSE: tl.constexpr,
    K_CAST: tl.constexpr, K_BITS: tl.constexpr, K_QBLOCK: tl.constexpr, K_OFFSET: tl.constexpr,
    K_HAS_ZERO: tl.constexpr, K_HAS_MULT: tl.constexpr, K_TOKEN_AXIS: tl.constexpr, K_FAST: tl.constexpr,
    K_WORD: tl.constexpr, K_MSB: tl.constexpr, K_STAGES: tl.constexpr,
    K_CODE_T: tl.constexpr, K_SCALE_T: tl.constexpr, K_CENT_T: tl.constexpr,
    K_A0_T: tl.constexpr, K_A1_T: tl.constexpr, K_A2_T: tl.constexpr, K_A3_T: tl.constexpr,
    K_VEC: tl.constexpr, K_WORDS_MULT: tl.constexpr, K_HAS_FP: tl.constexpr,
    V_CAST: tl.constexpr, V_BITS: tl.constexpr, V_QBLOCK: tl.constexpr, V_OFFSET: tl.constexpr,
    V_HAS_ZERO: tl.constexpr, V_HAS_MULT: tl.constexpr, V_TOKEN_AXIS: tl.constexpr, V_FAST: tl.constexpr,
    V_WORD: tl.constexpr, V_MSB: tl.constexpr, V_STAGES: tl.constexpr,
    V_CODE_T: tl.constexpr, V_SCALE_T: tl.constexpr, V_CENT_T: tl.constexpr,
    V_A0_T: tl.constexpr, V_A1_T: tl.constexpr, V_A2_T: tl.constexpr, V_A3_T: tl.constexpr,
    V_VEC: tl.constexpr, V_WORDS_MULT: tl.constexpr, V_HAS_FP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // (H // HKV)
    n = (b * HKV + hkv).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    r_ok = rows < SQ
    q_off = b.to(tl.int64) * q_sb + h * q_sh + rows[:, None] * q_ss + d[None, :]
    q = tl.load(q_ptr + q_off, mask=r_ok[:, None], other=0.0)
    q_lo = q
    if SPLIT_Q:  # the queries are q + ql (an fp32 query in two tensor-core operands)
        q_lo = tl.load(ql_ptr + q_off, mask=r_ok[:, None], other=0.0)
    if EMULATE:
        q = q.to(tl.float32)
        q_lo = q_lo.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    if HAS_SPANS:
        for i in range(n_spans):
            rec = span_ptr + i * S_LEN
            S = tl.load(rec + S_TOKENS).to(tl.int32)
            skip = tl.load(rec + S_SKIP).to(tl.int32)
            kt = _tensor_fields(
                rec + S_K, n, D, K_TOKEN_AXIS, K_HAS_MULT, K_CODE_T, K_SCALE_T, KV_T, K_CENT_T,
                K_A0_T, K_A1_T, K_A2_T, K_A3_T, K_VEC, K_WORDS_MULT)
            vt = _tensor_fields(
                rec + S_V, n, D, V_TOKEN_AXIS, V_HAS_MULT, V_CODE_T, V_SCALE_T, KV_T, V_CENT_T,
                V_A0_T, V_A1_T, V_A2_T, V_A3_T, V_VEC, V_WORDS_MULT)
            # aligned tiles (vector loads); the tiles that may reach full-precision tokens last, in
            # a loop of their own (a branch in the main loop would serialize the products)
            lo = skip // BLOCK_N * BLOCK_N
            hi = S
            if K_HAS_FP or V_HAS_FP:
                hi = tl.maximum(tl.minimum(kt[5], vt[5]) // BLOCK_N * BLOCK_N, lo)  # quantized tokens
            m_i, l_i, acc = _span_tiles(
                q, q_lo, m_i, l_i, acc, lo, hi, skip, S, qk_scale,
                kt, vt,
                D, BLOCK_N, SPAN_STAGES, SPLIT_Q, DOT_BF16, EMULATE,
                K_CAST, K_BITS, K_QBLOCK, K_OFFSET, K_HAS_ZERO, K_TOKEN_AXIS, K_FAST, K_WORD, K_MSB, K_STAGES, False,
                V_CAST, V_BITS, V_QBLOCK, V_OFFSET, V_HAS_ZERO, V_TOKEN_AXIS, V_FAST, V_WORD, V_MSB, V_STAGES, False)
            if K_HAS_FP or V_HAS_FP:
                m_i, l_i, acc = _span_tiles(
                    q, q_lo, m_i, l_i, acc, hi, S, skip, S, qk_scale,
                    kt, vt,
                    D, BLOCK_N, 1, SPLIT_Q, DOT_BF16, EMULATE,
                    K_CAST, K_BITS, K_QBLOCK, K_OFFSET, K_HAS_ZERO, K_TOKEN_AXIS, K_FAST, K_WORD, K_MSB, K_STAGES,
                    K_HAS_FP,
                    V_CAST, V_BITS, V_QBLOCK, V_OFFSET, V_HAS_ZERO, V_TOKEN_AXIS, V_FAST, V_WORD, V_MSB, V_STAGES,
                    V_HAS_FP)
    for i in range(n_dense):
        rec = dense_ptr + i * DN_LEN
        S = tl.load(rec + DN_TOKENS).to(tl.int32)
        k_base = tl.load(rec + DN_K).to(tl.pointer_type(KV_T)) + b * tl.load(rec + DN_K_STRIDE) + hkv * tl.load(rec + DN_K_STRIDE + 1)
        v_base = tl.load(rec + DN_V).to(tl.pointer_type(KV_T)) + b * tl.load(rec + DN_V_STRIDE) + hkv * tl.load(rec + DN_V_STRIDE + 1)
        # the host made every address and stride a multiple of 16 bytes (see _dense_record)
        k_base = tl.multiple_of(k_base, 16)
        v_base = tl.multiple_of(v_base, 16)
        k_ss = tl.multiple_of(tl.load(rec + DN_K_STRIDE + 2).to(tl.int32), DENSE_MULT)
        v_ss = tl.multiple_of(tl.load(rec + DN_V_STRIDE + 2).to(tl.int32), DENSE_MULT)
        for t0 in tl.range(0, S, BLOCK_N, num_stages=DENSE_STAGES):
            tok = t0 + tl.arange(0, BLOCK_N)
            t_ok = tok < S
            k = tl.load(k_base + tok[:, None] * k_ss + d[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(v_base + tok[:, None] * v_ss + d[None, :], mask=t_ok[:, None], other=0.0)
            if EMULATE:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = _dot(q, tl.trans(k), EMULATE)
            p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, t_ok, t0 + BLOCK_N > S, qk_scale)
            acc = _mma(_as_dot(p, DOT_BF16, EMULATE), v, acc * alpha[:, None], EMULATE)
    out = acc / l_i[:, None]
    if EMULATE and OUT_BF16:
        out = round_to_bf16(out)
    o_ptr = out_ptr + b.to(tl.int64) * o_sb + h * o_sh + rows[:, None] * o_ss + d[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    if WRITE_LSE:  # natural log-sum-exp of the scaled scores
        tl.store(lse_ptr + bh.to(tl.int64) * SQ + rows, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=r_ok)
