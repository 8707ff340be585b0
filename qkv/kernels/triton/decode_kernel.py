"""The @triton.jit code of attention for few queries over compressed spans (host side: decode.py).

Flash-decoding: the keys are cut into pieces and each program attends to one run of pieces for
every query of every query head that shares one KV head (rows = query heads x queries), so each
key and value tile is decoded once per KV head; the program writes its normalized partial output
and log-sum-exp, and ``merge_kernel`` combines the partials of every row exactly (log-sum-exp
weights). The partials are one fp32 buffer: the outputs [n_parts, rows, D], then the
log-sum-exps [n_parts, rows] (one allocation a call). Programs ``0 .. n_span_progs`` read span
pieces (work items of the span table, see records.py), the rest read the full-precision keys (up
to two segments, by address). Tiles are
decoded by ``tile.decode_tile``, as in the prefill kernel; the key and value layouts are the
constexprs ``K`` and ``V`` (records.TensorLayout).
"""

import triton
import triton.language as tl

from qkv.kernels.triton.attention_kernel import (
    S_K,
    S_LEN,
    S_TOKENS,
    S_V,
    _as_dot,
    _dot,
    _mma,
    _softmax_update,
)
from qkv.kernels.triton.bits import hadamard_dot, hadamard_sums, round_to_bf16
from qkv.kernels.triton.records import ITEM_FIELDS, offsets
from qkv.kernels.triton.tile import F_C, F_C_STRIDE, Source, arith, decode_tile, fp_rows_rotated, record_source

_I = offsets(ITEM_FIELDS)
I_LEN = tl.constexpr(len(ITEM_FIELDS))
I_SPAN = tl.constexpr(_I["span"])
I_LO = tl.constexpr(_I["lo"])
I_HI = tl.constexpr(_I["hi"])
I_AT = tl.constexpr(_I["at"])


@triton.jit
def _dense_piece(q, m_i, l_i, acc, k_ptr, v_ptr, k_ss, v_ss, lo, hi, qk_scale,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_BF16: tl.constexpr, EMULATE: tl.constexpr):
    """The online softmax over full-precision keys lo .. hi of one segment (k_ptr, v_ptr: its row
    for this (batch, KV head))."""
    d = tl.arange(0, D)
    for t0 in range(lo, hi, BLOCK_N):
        tok = t0 + tl.arange(0, BLOCK_N)
        t_ok = tok < hi
        k = tl.load(k_ptr + tok[:, None] * k_ss + d[None, :], mask=t_ok[:, None], other=0.0)
        v = tl.load(v_ptr + tok[:, None] * v_ss + d[None, :], mask=t_ok[:, None], other=0.0)
        if EMULATE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, tl.trans(k), EMULATE)
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, t_ok, True, qk_scale)
        acc = _mma(_as_dot(p, DOT_BF16, EMULATE), v, acc * alpha[:, None], EMULATE)
    return m_i, l_i, acc


@triton.jit
def _query_rows(n, r, H, HKV, SQ, q_sb, q_sh, q_ss, D: tl.constexpr):
    """(query head, query, offset in q [B, H, SQ, D] with strides q_s*) of the rows ``r`` of
    (batch, KV head) ``n``: a row is (query head in the KV head's group, query)."""
    group = H // HKV
    head = n % HKV * group + r // SQ
    s_row = r % SQ
    q_off = (n // HKV).to(tl.int64) * q_sb + head[:, None] * q_sh + s_row[:, None] * q_ss + tl.arange(0, D)[None, :]
    return head, s_row, q_off


@triton.jit
def centroid_scores_kernel(q_ptr, cs_ptr, span_ptr, H, HKV, SQ, c_max, q_sb, q_sh, q_ss,
                           D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
                           CENT_T: tl.constexpr, EMULATE: tl.constexpr):
    """q . c for every centroid c of every key stage of span ``program_id(0)`` of a span table,
    for the query rows of (batch, KV head) ``program_id(1)`` (rows as in ``decode_kernel``, at
    most BLOCK_M): cs [spans, STAGES, B * HKV, rows, c_max] fp32, each centroid's products read
    from bf16 operands once per call instead of once per key (``KEY_SCORES``)."""
    span = tl.program_id(0)
    n = tl.program_id(1)
    nb = tl.num_programs(1)
    rows = H // HKV * SQ
    r = tl.arange(0, BLOCK_M)
    r_ok = r < rows
    d = tl.arange(0, D)
    _, _, q_off = _query_rows(n, r, H, HKV, SQ, q_sb, q_sh, q_ss, D)
    q = tl.load(q_ptr + q_off, mask=r_ok[:, None], other=0.0)
    if EMULATE:
        q = q.to(tl.float32)
    rec = span_ptr + span * S_LEN + S_K
    for i in tl.static_range(STAGES):
        c_stride = tl.load(rec + F_C_STRIDE + i)  # clusters x D
        cent = tl.load(rec + F_C + i).to(tl.pointer_type(CENT_T)) + n * c_stride
        clusters = (c_stride // D).to(tl.int32)
        out = cs_ptr + ((span * STAGES + i) * nb + n).to(tl.int64) * rows * c_max
        for c0 in range(0, clusters, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < clusters
            c = tl.load(cent + cc[:, None] * D + d[None, :], mask=c_ok[:, None], other=0.0)
            if EMULATE:
                c = c.to(tl.float32)
            tl.store(out + r[:, None] * c_max + cc[None, :], _dot(q, tl.trans(c), EMULATE),
                     mask=r_ok[:, None] & c_ok[None, :])


@triton.jit
def _add_centroid_scores(s, src, cs, tok, r, r_ok, rows, c_max, stage_stride):
    """Scores s [rows, keys ``tok``] of a key tile decoded without its stages plus q . c of each
    stage's centroid under every quantized key, gathered from the span's table ``cs`` (see
    ``centroid_scores_kernel``; ``stage_stride``: from one stage's table to the next)."""
    q_ok = tok < src.quantized
    for i in tl.static_range(len(src.stages)):
        _, a, a_s = src.stages[i]
        idx = tl.load(a + tok * a_s, mask=q_ok, other=0).to(tl.int32)
        s += tl.load(cs + i * stage_stride + r[:, None] * c_max + idx[None, :], mask=r_ok[:, None] & q_ok[None, :],
                     other=0.0)
    return s


@triton.jit
def _piece_tiles(q, r, r_ok, m_i, l_i, acc, kt, kr, vt, lo, hi, t_lo, t_hi, S, cs, stage_stride, rows, c_max, qk_scale,
                 D: tl.constexpr, BLOCK_N: tl.constexpr, ARITH: tl.constexpr, DOT_BF16: tl.constexpr,
                 EMULATE: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KEY_SCORES: tl.constexpr,
                 BLOCK_M: tl.constexpr, TAIL: tl.constexpr):
    """The online softmax over the keys lo .. hi of one span in its tiles t_lo .. t_hi (multiples
    of BLOCK_N): (m_i, l_i, acc). ``kt`` / ``vt``: the span's keys and values, ``kr`` the keys as
    decoded (their residual alone with KEY_SCORES, see _span_pieces). TAIL: the tiles may reach
    the span's full-precision tokens, which a Hadamard-rotated tensor's tile takes into its stored
    basis (``tile.fp_rows_rotated``): a span of such a tensor reads its other tiles in a loop
    without that product."""
    # packed rows as runs (decode_tile's RUNS) where the tile goes through shared memory as
    # 16-bit stores without them and runs were faster: per-channel keys, every key tile of 64
    # query rows and more (Hopper's warpgroup product reads its second operand from shared
    # memory), and the values of such tiles if they have no centroids (a value tile with
    # centroids takes the layout of their gathers, stored as vectors already). Values at fewer
    # rows were slower with runs on an H100 despite fewer instructions (docs/attention.md)
    for t0 in range(t_lo, t_hi, BLOCK_N):
        k = decode_tile(kr, t0, S, K, D, BLOCK_N, D, TAIL and K.HAS_FP, ARITH, not K.TOKEN_AXIS or BLOCK_M >= 64)
        if TAIL and K.ROT and K.HAS_FP:
            k = fp_rows_rotated(k, kt, t0, D, BLOCK_N, EMULATE)
        tok = t0 + tl.arange(0, BLOCK_N)
        t_ok = (tok >= lo) & (tok < hi)
        s = _dot(q, tl.trans(_as_dot(k, DOT_BF16, EMULATE)), EMULATE)
        if KEY_SCORES:
            s = _add_centroid_scores(s, kt, cs, tok, r, r_ok, rows, c_max, stage_stride)
        v = decode_tile(vt, t0, S, V, D, BLOCK_N, D, TAIL and V.HAS_FP, ARITH, V.STAGES == 0 and BLOCK_M >= 64)
        if TAIL and V.ROT and V.HAS_FP:
            v = fp_rows_rotated(v, vt, t0, D, BLOCK_N, EMULATE)
        p, alpha, m_i, l_i = _softmax_update(s, m_i, l_i, t_ok, True, qk_scale)
        acc = _mma(_as_dot(p, DOT_BF16, EMULATE), _as_dot(v, DOT_BF16, EMULATE), acc * alpha[:, None], EMULATE)
    return m_i, l_i, acc


@triton.jit
def _span_pieces(
    qs_ptr, q_off, r, r_ok, m_i, l_i, acc, span_ptr, item_ptr, first, last, n, nb, rows, cs_ptr, c_max, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, KV_T: tl.constexpr, DOT_BF16: tl.constexpr, EMULATE: tl.constexpr,
    OUT_ROT: tl.constexpr, H_NORM: tl.constexpr, K: tl.constexpr, V: tl.constexpr, KEY_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The online softmax over the span work items first .. last: (m_i, l_i, acc). The queries
    are read at qs_ptr (H q for rotated keys, see decode.py). acc is left in the values' basis
    where that is the partials' (OUT_ROT: the rotated one, which the merge rotates back once;
    else the original one) and rotated into the partials' basis otherwise (H is symmetric and
    orthonormal: the same product either way). KEY_SCORES: the keys' centroids are not added to
    the decoded tiles; their scores q . c are gathered from the call's table at ``cs_ptr``
    (``centroid_scores_kernel``)."""
    q = tl.load(qs_ptr + q_off, mask=r_ok[:, None], other=0.0)
    if EMULATE:
        q = q.to(tl.float32)
    ARITH: tl.constexpr = arith(DOT_BF16, EMULATE)
    for it in range(first, last):
        item = item_ptr + it * I_LEN
        span = tl.load(item + I_SPAN).to(tl.int32)
        rec = span_ptr + span * S_LEN
        lo = tl.load(item + I_LO).to(tl.int32)
        hi = tl.load(item + I_HI).to(tl.int32)
        S = tl.load(rec + S_TOKENS).to(tl.int32)
        kt = record_source(rec + S_K, n, D, K, KV_T)
        vt = record_source(rec + S_V, n, D, V, KV_T)
        kr = kt
        if KEY_SCORES:  # the residual alone
            kr = Source(kt.codes, kt.scales, kt.zeros, kt.m, kt.fp, kt.quantized, kt.words, kt.groups, ())
        cs = cs_ptr + (span * K.STAGES * nb + n) * rows * c_max
        first = lo // BLOCK_N * BLOCK_N
        stage_stride = nb * rows * c_max
        if (K.ROT and K.HAS_FP) or (V.ROT and V.HAS_FP):
            # full-precision tokens of a rotated tensor (stored unrotated) are rotated into its
            # stored basis in the span's last tiles, in a loop of their own (see _piece_tiles)
            tail = tl.maximum(tl.minimum(kt.quantized, vt.quantized) // BLOCK_N * BLOCK_N, first)
            m_i, l_i, acc = _piece_tiles(q, r, r_ok, m_i, l_i, acc, kt, kr, vt, lo, hi, first, tl.minimum(tail, hi), S,
                                         cs, stage_stride, rows, c_max, qk_scale, D, BLOCK_N, ARITH, DOT_BF16,
                                         EMULATE, K, V, KEY_SCORES, BLOCK_M, False)
            first = tail
        m_i, l_i, acc = _piece_tiles(q, r, r_ok, m_i, l_i, acc, kt, kr, vt, lo, hi, first, hi, S, cs, stage_stride,
                                     rows, c_max, qk_scale, D, BLOCK_N, ARITH, DOT_BF16, EMULATE, K, V, KEY_SCORES,
                                     BLOCK_M, True)
    if OUT_ROT != V.ROT:
        acc = hadamard_dot(acc, D, EMULATE) * H_NORM  # H_NORM = 1 / sqrt(D)
    return m_i, l_i, acc


# Token counts and work sizes change from call to call (the tail grows by a token a step): Triton
# would compile a variant for each of their classes (equal to 1, a multiple of 16, other), every
# few hundred steps a new one, seconds each, in the middle of a generation. They only bound loops
# and masks, so they are passed unspecialized.
@triton.jit(do_not_specialize=["n_parts", "n_items", "per_prog", "n_span_progs", "prog_base", "dense_piece", "dn0",
                               "dn1"])
def decode_kernel(
    q_ptr, qs_ptr, po_ptr, n_parts, span_ptr, item_ptr, cs_ptr, c_max,
    n_items, per_prog, n_span_progs, prog_base, dense_piece,
    dk0, dv0, dn0, dk0_sb, dk0_sh, dk0_ss, dv0_sb, dv0_sh, dv0_ss,
    dk1, dv1, dn1, dk1_sb, dk1_sh, dk1_ss, dv1_sb, dv1_sh, dv1_ss, live_ptr,
    H, HKV, SQ, ROWS_TOTAL, q_sb, q_sh, q_ss, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_T: tl.constexpr, DOT_BF16: tl.constexpr, EMULATE: tl.constexpr, HAS_SPANS: tl.constexpr,
    HAS_DENSE: tl.constexpr, OUT_ROT: tl.constexpr, H_NORM: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, KEY_SCORES: tl.constexpr, LIVE: tl.constexpr,
):
    """LIVE: the second full-precision segment's first ``*live_ptr`` keys are its keys (an int32
    the device holds, at most its ``dn1`` keys of room): a call replayed from a CUDA graph while the
    tail grows (see decode.py)."""
    pid = tl.program_id(0)
    n = tl.program_id(1)  # b * HKV + kv head
    b = n // HKV
    hkv = n % HKV
    group = H // HKV
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows: (query head in the group, query)
    r_ok = r < group * SQ
    head, s_row, q_off = _query_rows(n, r, H, HKV, SQ, q_sb, q_sh, q_ss, D)
    d = tl.arange(0, D)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    if pid < n_span_progs:
        if HAS_SPANS:
            m_i, l_i, acc = _span_pieces(
                qs_ptr, q_off, r, r_ok, m_i, l_i, acc, span_ptr, item_ptr, pid * per_prog,
                tl.minimum(pid * per_prog + per_prog, n_items), n.to(tl.int64), tl.num_programs(1), group * SQ,
                cs_ptr, c_max, qk_scale, D, BLOCK_N, KV_T, DOT_BF16, EMULATE, OUT_ROT, H_NORM, K, V, KEY_SCORES,
                BLOCK_M)
    else:
        if HAS_DENSE:
            q = tl.load(q_ptr + q_off, mask=r_ok[:, None], other=0.0)
            if EMULATE:
                q = q.to(tl.float32)
            lo = (pid - n_span_progs) * dense_piece
            hi = lo + dense_piece
            k0 = dk0 + b.to(tl.int64) * dk0_sb + hkv * dk0_sh
            v0 = dv0 + b.to(tl.int64) * dv0_sb + hkv * dv0_sh
            m_i, l_i, acc = _dense_piece(q, m_i, l_i, acc, k0, v0, dk0_ss, dv0_ss, tl.minimum(lo, dn0),
                                         tl.minimum(hi, dn0), qk_scale, D, BLOCK_N, DOT_BF16, EMULATE)
            if LIVE:
                dn1 = tl.minimum(tl.load(live_ptr), dn1)
            k1 = dk1 + b.to(tl.int64) * dk1_sb + hkv * dk1_sh
            v1 = dv1 + b.to(tl.int64) * dv1_sb + hkv * dv1_sh
            m_i, l_i, acc = _dense_piece(q, m_i, l_i, acc, k1, v1, dk1_ss, dv1_ss, tl.maximum(lo - dn0, 0),
                                         tl.minimum(tl.maximum(hi - dn0, 0), dn1), qk_scale, D, BLOCK_N,
                                         DOT_BF16, EMULATE)
            if OUT_ROT:  # into the rotated basis of the span partials
                acc = hadamard_dot(acc, D, EMULATE) * H_NORM
    empty = l_i == 0.0  # no key of this piece for the row: weight 0 in the merge
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))  # log2 domain
    row = (b * H + head).to(tl.int64) * SQ + s_row  # row of [B, H, SQ]
    slot = (prog_base + pid).to(tl.int64) * ROWS_TOTAL
    tl.store(po_ptr + (slot + row)[:, None] * D + d[None, :], out, mask=r_ok[:, None])
    pl_ptr = po_ptr + n_parts.to(tl.int64) * ROWS_TOTAL * D  # the log-sum-exps after the outputs
    tl.store(pl_ptr + slot + row, lse, mask=r_ok)


@triton.jit(do_not_specialize=["n_parts"])
def merge_kernel(po_ptr, out_ptr, n_parts, ROWS_TOTAL, H, SQ, o_sb, o_sh, o_ss,
                 D: tl.constexpr, BLOCK_P: tl.constexpr, EMULATE_BF16: tl.constexpr,
                 ROT: tl.constexpr, H_NORM: tl.constexpr):
    """Combine the partials [n_parts, ROWS_TOTAL, D] (log2-domain lse) of one row of [B, H, SQ]
    (a program per row, BLOCK_P partials per load, so every part of a row is in flight at once)
    into out (q's dtype, strides o_*); ROT: the partials are in the Hadamard-rotated basis, and
    the row is rotated back once here (see decode.py). EMULATE_BF16:
    round to bf16 by the bits (the interpreter's own conversion truncates)."""
    r = tl.program_id(0).to(tl.int64)
    pl_ptr = po_ptr + n_parts.to(tl.int64) * ROWS_TOTAL * D  # the log-sum-exps after the outputs
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, D)
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        m = tl.maximum(m, tl.load(pl_ptr + (p0 + p) * ROWS_TOTAL + r, mask=p0 + p < n_parts, other=float("-inf")))
    top = tl.max(m, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK_P,), tl.float32)
    acc = tl.zeros((BLOCK_P, D), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        at = p0 + p
        w = tl.math.exp2(tl.load(pl_ptr + at * ROWS_TOTAL + r, mask=at < n_parts, other=float("-inf")) - top)
        part = tl.load(po_ptr + (at.to(tl.int64) * ROWS_TOTAL + r)[:, None] * D + d[None, :],
                       mask=(w > 0.0)[:, None], other=0.0)
        acc += w[:, None] * part
        total += w
    whole = tl.sum(total, 0)
    out = tl.sum(acc, 0) / whole
    bh = r // SQ
    o = out_ptr + (bh // H) * o_sb + (bh % H) * o_sh + (r % SQ) * o_ss
    if ROT:
        out = tl.reshape(hadamard_sums(tl.reshape(out, (1, D)), D), (D,)) * H_NORM
    if EMULATE_BF16:
        out = round_to_bf16(out)
    tl.store(o + d, out.to(out_ptr.dtype.element_ty))
