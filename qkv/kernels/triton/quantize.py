"""Triton (centroids+)quantize+pack and unpack+dequantize(+centroids), twins of
qkv/kernels/quantize.py.

Results equal the plain-torch reference bit for bit: same fp32 operation order, IEEE division
(``div_rn``), no fused multiply-add (kernels are launched with ``enable_fp_fusion=False``), ties
rounded to even, scales and zero points rounded up/down into their format exactly as the
reference does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkv.dtypes import max_finite
from qkv.kernels.quantize import QuantizedRows, check_quantize_args, row_multiplier, rows_dim
from qkv.kernels.triton.bits import (
    LAUNCH_STAGES,
    pack_word,
    round_down,
    round_half_even,
    round_to_bf16,
    round_up,
    unpack_code,
)
from qkv.format import AffineFormat

FORMAT_CODE = {"fp32": 0, "fp16": 1, "bf16": 2, "fp8": 3}
MODE_CODE = {"sym": 0, "midrise": 1, "asym": 2}


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@triton.jit
def _stage_centroids(c_ptr, a_ptr, c_sn, a_sn, a_ss, pid_n, r, l, r_ok, l_ok, mask, D, TOKEN_AXIS: tl.constexpr):
    """fp32 [BLOCK_R, BLOCK_L]: the centroid value (one stage) under every element of a tile of
    rows r x columns l; rows are tokens (TOKEN_AXIS) or channels."""
    if TOKEN_AXIS:
        a = tl.load(a_ptr + pid_n * a_sn + r * a_ss, mask=r_ok, other=0).to(tl.int64)
        off = a[:, None] * D + l[None, :]
    else:
        a = tl.load(a_ptr + pid_n * a_sn + l * a_ss, mask=l_ok, other=0).to(tl.int64)
        off = a[None, :] * D + r[:, None]
    return tl.load(c_ptr + pid_n * c_sn + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _residual_tile(
    x_ptr, x_sn, x_sr, pid_n, r, l, r_ok, l_ok, mask, D,
    c0, a0, c1, a1, c2, a2, c3, a3,
    cs0, cs1, cs2, cs3, an0, an1, an2, an3, as0, as1, as2, as3,
    STAGES: tl.constexpr, TOKEN_AXIS: tl.constexpr,
):
    """fp32 tile of ``x - sum_t centroids[t][assignments[t]]`` (x read in its own dtype, stages
    subtracted in order: the twin's fp32 operations); 0 where masked."""
    x = tl.load(x_ptr + pid_n * x_sn + r.to(tl.int64)[:, None] * x_sr + l[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if STAGES > 0:
        x = x - _stage_centroids(c0, a0, cs0, an0, as0, pid_n, r, l, r_ok, l_ok, mask, D, TOKEN_AXIS)
    if STAGES > 1:
        x = x - _stage_centroids(c1, a1, cs1, an1, as1, pid_n, r, l, r_ok, l_ok, mask, D, TOKEN_AXIS)
    if STAGES > 2:
        x = x - _stage_centroids(c2, a2, cs2, an2, as2, pid_n, r, l, r_ok, l_ok, mask, D, TOKEN_AXIS)
    if STAGES > 3:
        x = x - _stage_centroids(c3, a3, cs3, an3, as3, pid_n, r, l, r_ok, l_ok, mask, D, TOKEN_AXIS)
    return x


@triton.jit
def _block_peak_kernel(
    x_ptr, part_ptr,
    c0, a0, c1, a1, c2, a2, c3, a3,
    cs0, cs1, cs2, cs3, an0, an1, an2, an3, as0, as1, as2, as3,
    x_sn, x_sr, R, L, D,
    QBLOCK: tl.constexpr, MODE: tl.constexpr, STEPS: tl.constexpr, STAGES: tl.constexpr,
    TOKEN_AXIS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Largest block peak (scale, or |zero point| for asym; see ``block_peaks``) of one tile of
    the residual, written to ``part[n, tile]``; the row's peak is the max over its tiles."""
    pid_n = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    l_ok = l < L
    mask = r_ok[:, None] & l_ok[None, :]
    x = _residual_tile(
        x_ptr, x_sn, x_sr, pid_n, r, l, r_ok, l_ok, mask, D,
        c0, a0, c1, a1, c2, a2, c3, a3,
        cs0, cs1, cs2, cs3, an0, an1, an2, an3, as0, as1, as2, as3,
        STAGES, TOKEN_AXIS,
    )
    # masked elements are 0 and whole blocks (the block divides L), so their peaks are 0
    xb = tl.reshape(x, (BLOCK_R, BLOCK_L // QBLOCK, QBLOCK))
    if MODE == 2:
        low = tl.min(xb, axis=2)
        peak = tl.maximum(tl.math.div_rn(tl.max(xb, axis=2) - low, STEPS), tl.abs(low))
    else:
        peak = tl.math.div_rn(tl.max(tl.abs(xb), axis=2), STEPS)
    tiles = tl.num_programs(0) * tl.num_programs(2)
    tile = tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)
    tl.store(part_ptr + pid_n * tiles + tile, tl.max(tl.max(peak, axis=1), axis=0))


@triton.jit
def _quantize_pack_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, mult_ptr,
    c0, a0, c1, a1, c2, a2, c3, a3,
    cs0, cs1, cs2, cs3, an0, an1, an2, an3, as0, as1, as2, as3,
    x_sn, x_sr, R, L, P, G, D,
    BITS: tl.constexpr, QBLOCK: tl.constexpr, MODE: tl.constexpr, OFFSET: tl.constexpr,
    STEPS: tl.constexpr, LEVELS: tl.constexpr, ZERO_CODE: tl.constexpr, FMT: tl.constexpr, HAS_MULT: tl.constexpr,
    STAGES: tl.constexpr, TOKEN_AXIS: tl.constexpr,
    WORD: tl.constexpr, MSB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_n = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    l = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    l_ok = l < L
    mask = r_ok[:, None] & l_ok[None, :]
    row = pid_n * R + r  # outputs are contiguous [N, R, ...]
    x = _residual_tile(
        x_ptr, x_sn, x_sr, pid_n, r, l, r_ok, l_ok, mask, D,
        c0, a0, c1, a1, c2, a2, c3, a3,
        cs0, cs1, cs2, cs3, an0, an1, an2, an3, as0, as1, as2, as3,
        STAGES, TOKEN_AXIS,
    )
    xb = tl.reshape(x, (BLOCK_R, BLOCK_L // QBLOCK, QBLOCK))
    m = 1.0
    if HAS_MULT:
        m = tl.load(mult_ptr + pid_n)
    if MODE == 2:
        low = tl.min(xb, axis=2)
        high = tl.max(xb, axis=2)
        zero = round_down(tl.math.div_rn(low, m), FMT) * m
        scale = round_up(tl.math.div_rn(tl.math.div_rn(high - zero, STEPS), m), FMT) * m
    else:
        zero = tl.zeros((BLOCK_R, BLOCK_L // QBLOCK), tl.float32)
        peak = tl.math.div_rn(tl.max(tl.abs(xb), axis=2), STEPS)
        scale = round_up(tl.math.div_rn(peak, m), FMT) * m
    # stored scale / zero (relative to m; m is a power of two, so the division is exact)
    g = tl.program_id(2) * (BLOCK_L // QBLOCK) + tl.arange(0, BLOCK_L // QBLOCK)
    g_mask = r_ok[:, None] & (g < G)[None, :]
    sidx = row[:, None] * G + g[None, :]
    tl.store(scales_ptr + sidx, (scale / m).to(scales_ptr.dtype.element_ty), mask=g_mask)
    if MODE == 2:
        tl.store(zeros_ptr + sidx, (zero / m).to(zeros_ptr.dtype.element_ty), mask=g_mask)
    s3 = scale[:, :, None]
    safe = tl.where(s3 > 0, s3, 1.0)
    v = tl.math.div_rn(xb - zero[:, :, None], safe) + OFFSET
    code = tl.minimum(tl.maximum(round_half_even(v), 0.0), LEVELS - 1.0)
    code = tl.where(s3 > 0, code, ZERO_CODE)
    code = tl.where(mask, tl.reshape(code, (BLOCK_R, BLOCK_L)), 0.0)
    if WORD == 8:  # byte words: every shifted field fits 32 bits
        code = code.to(tl.int32)
    else:
        code = code.to(tl.int64)
    groups = tl.reshape(code, (BLOCK_R, BLOCK_L // WORD, WORD))
    w = tl.program_id(2) * (BLOCK_L // WORD) + tl.arange(0, BLOCK_L // WORD)
    for k in tl.static_range(BITS):
        word = pack_word(groups, k, BITS, WORD, MSB)
        widx = w * BITS + k
        wmask = r_ok[:, None] & (widx < P)[None, :]
        if WORD == 32:
            word = tl.where(word >= 2147483648, word - 4294967296, word)
        tl.store(codes_ptr + row[:, None] * P + widx[None, :], word.to(codes_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def _add_centroids(out, c_ptr, a_ptr, c_stride, a_stride, pid_n, s, d, s_ok, mask, D):
    """out [BLOCK_S, BLOCK_D] + the centroid of each token's group (one stage)."""
    a = tl.load(a_ptr + pid_n * a_stride + s, mask=s_ok, other=0).to(tl.int64)
    return out + tl.load(c_ptr + pid_n * c_stride + a[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, zeros_ptr, mult_ptr, out_ptr,
    c0, a0, c1, a1, c2, a2, c3, a3,
    cs0, cs1, cs2, cs3, as0, as1, as2, as3,
    S, D, R, P, G, OUT_N,
    BITS: tl.constexpr, QBLOCK: tl.constexpr, OFFSET: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_MULT: tl.constexpr, TOKEN_AXIS: tl.constexpr, STAGES: tl.constexpr,
    WORD: tl.constexpr, MSB: tl.constexpr, OUT_BF16: tl.constexpr, LIMIT: tl.constexpr, FAST: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    mask = (s < S)[:, None] & (d < D)[None, :]
    if TOKEN_AXIS:
        row = s[:, None] + 0 * d[None, :]
        col = d[None, :] + 0 * s[:, None]
    else:
        row = d[None, :] + 0 * s[:, None]
        col = s[:, None] + 0 * d[None, :]
    row = pid_n * R + row
    s_ok = s < S
    m = 1.0
    if HAS_MULT:
        m = tl.load(mult_ptr + pid_n)
    if FAST:
        # token axis, D a power of two, whole codes per word: load the packed row once, coalesced,
        # and expand every word into its codes by shifts
        PER: tl.constexpr = WORD // BITS
        w = tl.arange(0, BLOCK_D // PER)
        tok = pid_n * R + s
        words = tl.load(codes_ptr + tok[:, None] * P + w[None, :], mask=s_ok[:, None], other=0).to(tl.int32)
        j = tl.arange(0, PER)
        if MSB:
            shift = (PER - 1 - j) * BITS
        else:
            shift = j * BITS
        code = tl.reshape((words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1), (BLOCK_S, BLOCK_D))
        g = tl.arange(0, BLOCK_D // QBLOCK)
        sidx = tok[:, None] * G + g[None, :]
        scale = tl.load(scales_ptr + sidx, mask=s_ok[:, None], other=0.0).to(tl.float32) * m
        code3 = tl.reshape(code.to(tl.float32), (BLOCK_S, BLOCK_D // QBLOCK, QBLOCK))
        out3 = (code3 - OFFSET) * scale[:, :, None]
        if HAS_ZERO:
            zero = tl.load(zeros_ptr + sidx, mask=s_ok[:, None], other=0.0).to(tl.float32) * m
            out3 = out3 + zero[:, :, None]
        out = tl.reshape(out3, (BLOCK_S, BLOCK_D))
    else:
        code = unpack_code(codes_ptr + row * P, col, mask, BITS, WORD, MSB)
        sidx = row * G + col // QBLOCK
        scale = tl.load(scales_ptr + sidx, mask=mask, other=0.0).to(tl.float32) * m
        out = (code.to(tl.float32) - OFFSET) * scale
        if HAS_ZERO:
            zero = tl.load(zeros_ptr + sidx, mask=mask, other=0.0).to(tl.float32) * m
            out = out + zero
    if STAGES > 0:
        out = _add_centroids(out, c0, a0, cs0, as0, pid_n, s, d, s_ok, mask, D)
    if STAGES > 1:
        out = _add_centroids(out, c1, a1, cs1, as1, pid_n, s, d, s_ok, mask, D)
    if STAGES > 2:
        out = _add_centroids(out, c2, a2, cs2, as2, pid_n, s, d, s_ok, mask, D)
    if STAGES > 3:
        out = _add_centroids(out, c3, a3, cs3, as3, pid_n, s, d, s_ok, mask, D)
    if LIMIT > 0:  # saturate to the output format's finite range (qkv.dtypes.saturate)
        out = tl.minimum(tl.maximum(out, -LIMIT), LIMIT)
    if OUT_BF16:
        out = round_to_bf16(out)
    tl.store(out_ptr + pid_n * OUT_N + s[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_pack_supports(x, q: AffineFormat, centroids=(), assignments=()) -> str | None:
    """Why the Triton kernel cannot run this case (None if it can); raises on malformed inputs."""
    check_quantize_args(x, q, centroids, assignments)
    if not _is_pow2(q.block):
        return f"block {q.block} is not a power of two"
    if q.block > 1024:
        return f"block {q.block} is larger than 1024"
    if len(centroids) > LAUNCH_STAGES:
        return f"{len(centroids)} stages (at most {LAUNCH_STAGES} per launch)"
    return None


def _stage_args(dummy: torch.Tensor, centroids, assignments) -> list:
    """Kernel arguments of up to LAUNCH_STAGES stages: (c, a) x 4, centroid N strides, assignment N
    and S strides (unused stages: ``dummy`` pointers, zero strides)."""
    cents = [c.contiguous() for c in centroids]
    assigns = list(assignments)
    pad = LAUNCH_STAGES - len(cents)
    ptrs = [t for pair in zip(cents + [dummy] * pad, assigns + [dummy] * pad) for t in pair]
    c_n = [c.stride(0) for c in cents] + [0] * pad
    a_n = [a.stride(0) for a in assigns] + [0] * pad
    a_s = [a.stride(1) for a in assigns] + [0] * pad
    return ptrs + c_n + a_n + a_s


def quantize_pack_triton(
    x: torch.Tensor, q: AffineFormat, centroids=(), assignments=()
) -> QuantizedRows:
    """Triton twin of :func:`qkv.kernels.quantize.quantize_pack_torch`: x (any float dtype, rows
    with unit stride) is read as it is and the stages' centroids are gathered and subtracted in
    registers; only codes, scales and zeros are written. Two launches: the block-peak pass (only
    for scale formats with a row multiplier), then quantize+pack."""
    check_quantize_args(x, q, centroids, assignments)
    n, r, length = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    d = length if q.axis == "token" else r
    stage = _stage_args(x, centroids, assignments)
    common = dict(STAGES=len(centroids), TOKEN_AXIS=q.axis == "token", enable_fp_fusion=False)
    block_l = max(min(triton.next_power_of_2(length), 512), q.block, q.pack.word_bits)
    mult = None
    if q.scale != "fp32":
        peak_r = max(1, min(128, 8192 // block_l))
        grid = (triton.cdiv(r, peak_r), n, triton.cdiv(length, block_l))
        part = torch.empty(n, grid[0] * grid[2], dtype=torch.float32, device=x.device)
        _block_peak_kernel[grid](
            x, part, *stage, x.stride(0), x.stride(1), r, length, d,
            QBLOCK=q.block, MODE=MODE_CODE[q.mode], STEPS=q.steps, BLOCK_R=peak_r, BLOCK_L=block_l, **common,
        )
        mult = row_multiplier(part.amax(-1), q)
    groups = length // q.block
    p = q.pack.packed_len(length, q.bits)
    codes = torch.empty(n, r, p, dtype=q.pack.container, device=x.device)
    scales = torch.empty(n, r, groups, dtype=q.scale_dtype, device=x.device)
    zeros = torch.empty_like(scales) if q.has_zero else None
    block_r = max(1, min(64, 4096 // block_l))
    grid = (triton.cdiv(r, block_r), n, triton.cdiv(length, block_l))
    _quantize_pack_kernel[grid](
        x, codes, scales, scales if zeros is None else zeros, x if mult is None else mult,
        *stage, x.stride(0), x.stride(1), r, length, p, groups, d,
        BITS=q.bits, QBLOCK=q.block, MODE=MODE_CODE[q.mode], OFFSET=q.offset, STEPS=q.steps,
        LEVELS=q.levels, ZERO_CODE=float(math.floor(q.offset)), FMT=FORMAT_CODE[q.scale], HAS_MULT=mult is not None,
        WORD=q.pack.word_bits, MSB=q.pack.msb_first, BLOCK_R=block_r, BLOCK_L=block_l, **common,
    )
    return QuantizedRows(codes, scales, zeros, mult)


def dequantize_supports(rows, q, tokens, centroids, assignments, out_dtype=torch.float32, out=None):
    if len(centroids) > LAUNCH_STAGES:
        return f"{len(centroids)} stages (at most {LAUNCH_STAGES} per launch)"
    d = rows_dim(rows, q)
    if out is not None and (out.stride(2) != 1 or out.stride(1) != d):
        return "out's rows are not contiguous"
    if d > 1024:
        return f"head_dim {d} is larger than 1024"
    return None


def dequantize_triton(rows, q, tokens, centroids, assignments, out_dtype=torch.float32, out=None):
    """Triton twin of :func:`qkv.kernels.quantize.dequantize_torch` (one pass, all stages); ``out``
    may be a view whose rows are contiguous (a slice of a longer buffer along the tokens)."""
    n, d = rows.codes.shape[0], rows_dim(rows, q)
    r = tokens if q.axis == "token" else d
    if out is None:
        out = torch.empty(n, tokens, d, dtype=out_dtype, device=rows.codes.device)
    stages = len(centroids)
    dummy = rows.codes
    cents = [c.contiguous() for c in centroids] + [dummy] * (LAUNCH_STAGES - stages)
    assigns = list(assignments) + [dummy] * (LAUNCH_STAGES - stages)
    c_strides = [c.stride(0) for c in cents]
    a_strides = [a.stride(0) for a in assigns]
    for a in assigns[:stages]:
        if a.stride(1) != 1:
            raise ValueError("assignments must be contiguous along tokens")
    block_d = triton.next_power_of_2(d)
    per_word = q.pack.word_bits // q.bits
    fast = (  # whole power-of-two rows of whole words: see the kernel's FAST branch
        q.axis == "token" and d == block_d and q.pack.word_bits % q.bits == 0
        and d % per_word == 0 and _is_pow2(q.block) and d % q.block == 0
    )
    # 4096-value tiles on the fast path (32 tokens of D = 128, 4 warps): with them the LongCat decode of
    # benchmarks/bench_kernels.py went from 0.139 ms (8192-value tiles) to 0.114 ms on an H100
    block_s = max(1, min(128, (4096 if fast else 8192) // block_d))
    grid = (n, triton.cdiv(tokens, block_s))
    _dequantize_kernel[grid](
        rows.codes, rows.scales, rows.scales if rows.zeros is None else rows.zeros,
        rows.codes if rows.mult is None else rows.mult, out,
        cents[0], assigns[0], cents[1], assigns[1], cents[2], assigns[2], cents[3], assigns[3],
        *c_strides, *a_strides,
        tokens, d, r, rows.codes.shape[-1], rows.scales.shape[-1], out.stride(0),
        BITS=q.bits, QBLOCK=q.block, OFFSET=q.offset, HAS_ZERO=rows.zeros is not None,
        HAS_MULT=rows.mult is not None, TOKEN_AXIS=q.axis == "token", STAGES=stages,
        WORD=q.pack.word_bits, MSB=q.pack.msb_first, OUT_BF16=out_dtype == torch.bfloat16,
        LIMIT=0.0 if out_dtype == torch.float32 else max_finite(out_dtype),
        FAST=fast, BLOCK_S=block_s, BLOCK_D=block_d,
        enable_fp_fusion=False, num_warps=4,
    )
    return out
