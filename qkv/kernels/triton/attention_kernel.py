"""The @triton.jit code of the attention over compressed spans (host side: attention.py).

``attention_kernel`` runs, for a block of queries of one (batch, head), a FlashAttention-style loop
(online softmax in the log2 domain, fp32 accumulators, tensor-core products in the queries' dtype)
over every compressed span of a table (decoding each key and value tile in registers right before
its product, with ``tile.decode_tile``) and then over every full-precision segment of a second
table. Field offsets in the tables are read by name: the ``S_*`` / ``DN_*`` constants below (and
``tile.py``'s ``F_*``) are built from the field tables of records.py (``SPAN_FIELDS`` /
``DENSE_FIELDS`` / ``TENSOR_FIELDS``), which the host fills. The key and value layouts are the
constexprs ``K`` and ``V`` (records.TensorLayout, read by field name).
"""

import triton
import triton.language as tl

from qkv.kernels.triton.bits import round_to_bf16
from qkv.kernels.triton.records import DENSE_FIELDS, SPAN_FIELDS, offsets
from qkv.kernels.triton.tile import decode_tile, fp_rows_rotated, record_source

_S = offsets(SPAN_FIELDS)
_DN = offsets(DENSE_FIELDS)
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
def _span_tiles(q, m_i, l_i, acc, lo, hi, skip, S, qk_scale, kt, vt, K: tl.constexpr, V: tl.constexpr,
                D: tl.constexpr, BLOCK_N: tl.constexpr, PIPE: tl.constexpr,
                DOT_BF16: tl.constexpr, EMULATE: tl.constexpr, TAIL: tl.constexpr):
    """The online softmax over the key tiles lo .. hi (multiples of BLOCK_N) of one span whose keys
    and values are ``kt`` and ``vt`` (tile.Source): (m_i, l_i, acc). PIPE: the software-pipelining
    depth of the loop. TAIL: the tiles may reach the span's full-precision tokens (a
    Hadamard-rotated tensor's taken into its stored basis, ``tile.fp_rows_rotated``). Tiles without
    centroids load their packed rows as runs (decode_tile's RUNS): both products read their second
    operand from shared memory, which without runs Triton fills 16 bits at a time; a tile with
    centroids takes the layout of their gathers, stored as vectors already (the span loop's
    instructions: benchmarks/decode_sass.py --fused)."""
    for t0 in tl.range(lo, hi, BLOCK_N, num_stages=PIPE):
        k = decode_tile(kt, t0, S, K, D, BLOCK_N, D, TAIL and K.HAS_FP, "fma", K.STAGES == 0)
        if TAIL and K.ROT and K.HAS_FP:
            k = fp_rows_rotated(k, kt, t0, D, BLOCK_N, EMULATE)
        tok = t0 + tl.arange(0, BLOCK_N)
        t_ok = (tok >= skip) & (tok < S)
        # issue q @ k^T, decode the value tile while the tensor cores work, then the softmax
        s = _dot(q, tl.trans(_as_dot(k, DOT_BF16, EMULATE)), EMULATE)
        v = decode_tile(vt, t0, S, V, D, BLOCK_N, D, TAIL and V.HAS_FP, "fma", V.STAGES == 0)
        if TAIL and V.ROT and V.HAS_FP:
            v = fp_rows_rotated(v, vt, t0, D, BLOCK_N, EMULATE)
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, t_ok, (t0 < skip) | (t0 + BLOCK_N > S), qk_scale)
        acc = _mma(_as_dot(p, DOT_BF16, EMULATE), _as_dot(v, DOT_BF16, EMULATE), acc * alpha[:, None], EMULATE)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["n_dense", "n_spans"])  # counts that change per call (see decode_kernel)
def attention_kernel(
    q_ptr, out_ptr, lse_ptr, dense_ptr, span_ptr,
    n_dense, n_spans, H, HKV, SQ,
    q_sb, q_sh, q_ss, o_sb, o_sh, o_ss, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPAN_STAGES: tl.constexpr, DENSE_STAGES: tl.constexpr,
    KV_T: tl.constexpr, DENSE_MULT: tl.constexpr, DOT_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
    EMULATE: tl.constexpr, HAS_SPANS: tl.constexpr, WRITE_LSE: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
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
    if EMULATE:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    if HAS_SPANS:
        for i in range(n_spans):
            rec = span_ptr + i * S_LEN
            S = tl.load(rec + S_TOKENS).to(tl.int32)
            skip = tl.load(rec + S_SKIP).to(tl.int32)
            kt = record_source(rec + S_K, n, D, K, KV_T)
            vt = record_source(rec + S_V, n, D, V, KV_T)
            # aligned tiles (vector loads); the tiles that may reach full-precision tokens last, in
            # a loop of their own (a branch in the main loop would serialize the products)
            lo = skip // BLOCK_N * BLOCK_N
            hi = S
            if K.HAS_FP or V.HAS_FP:
                hi = tl.maximum(tl.minimum(kt.quantized, vt.quantized) // BLOCK_N * BLOCK_N, lo)
            m_i, l_i, acc = _span_tiles(q, m_i, l_i, acc, lo, hi, skip, S, qk_scale, kt, vt, K, V,
                                        D, BLOCK_N, SPAN_STAGES, DOT_BF16, EMULATE, False)
            if K.HAS_FP or V.HAS_FP:
                m_i, l_i, acc = _span_tiles(q, m_i, l_i, acc, hi, S, skip, S, qk_scale, kt, vt, K, V,
                                            D, BLOCK_N, 1, DOT_BF16, EMULATE, True)
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
