"""Triton (centroids+)quantize+pack and unpack+dequantize(+centroids), twins of
qkv/kernels/quantize.py.

Results equal the plain-torch reference bit for bit: same fp32 operation order, IEEE division
where the reference divides (``div_rn``; a value by its block's scale as ``bits.quotient``
rounds it, from one division a block), no fused multiply-add but the ones that make that
quotient exact, and libdevice without flush-to-zero (kernels are launched with
``bits.EXACT_LAUNCH``), ties rounded to even,
scales and zero points rounded up/down into their format exactly as the reference does.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkv.dtypes import max_finite
from qkv.kernels.quantize import HEADROOM, QuantizedRows, check_quantize_args, rows_dim
from qkv.kernels.triton.bits import (
    EXACT_LAUNCH, LAUNCH_STAGES, divisor_parts, nearest_int, pack_word, pairs_a_thread, quotient, round_down, round_up,
    to_output,
)
from qkv.kernels.triton.records import MIN_TOKEN_TILE, code_layout, is_pow2
from qkv.kernels.triton.tile import Source, add_stages, decode_tile, stage_rows
from qkv.kernels.triton.tiles import DequantizeTile, QuantizeTile, tile_for
from qkv.format import AffineFormat

FORMAT_CODE = {"fp32": 0, "fp16": 1, "bf16": 2, "fp8": 3}
MODE_CODE = {"sym": 0, "midrise": 1, "asym": 2}


# The passes of _quantize_pack_kernel
ONE_PASS, SPECULATE, SETTLE = 0, 1, 2


@triton.jit
def _residual_tile(x_ptr, stages, n, rt, lt, x_sn, x_sr, R, L, D, TOKEN_AXIS: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """Tile (rt, lt) of (batch, head) row n of rows [N, R, L] (rows: tokens if TOKEN_AXIS, else
    channels): its row indices r and r_ok, the tile's mask, and the fp32 residual
    ``x - sum_t centroids[t][assignments[t]]`` there (x read in its own dtype, stages subtracted
    in order: the twin's fp32 operations; 0 where masked)."""
    r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    l = lt * BLOCK_L + tl.arange(0, BLOCK_L)
    r_ok = r < R
    l_ok = l < L
    mask = r_ok[:, None] & l_ok[None, :]
    x = tl.load(x_ptr + n * x_sn + r.to(tl.int64)[:, None] * x_sr + l[None, :], mask=mask, other=0.0)
    if TOKEN_AXIS:
        tok, tok_ok, ch = r, r_ok, l
    else:
        tok, tok_ok, ch = l, l_ok, r
    x = add_stages(x.to(tl.float32), stage_rows(stages, n), tok, tok_ok, ch, mask, D, TOKEN_AXIS, True)
    return r, r_ok, mask, x


@triton.jit
def _row_multiplier(part_ptr, tiles, LIMIT: tl.constexpr):
    """``row_multiplier`` of the row whose ``tiles`` tile maxima of block peaks start at ``part_ptr``: the
    least 2**e >= peak / LIMIT, e in [-126, 127] (from the quotient's exponent bits, as frexp),
    1 for a zero row."""
    # one wide load covers most rows (a LongCat-Video span has 464 tiles): a program does not
    # wait on a chain of loads before its first division
    t = tl.arange(0, 1024)
    peak = tl.max(tl.load(part_ptr + t, mask=t < tiles, other=0.0), axis=0)
    for t0 in range(1024, tiles, 1024):
        peak = tl.maximum(peak, tl.max(tl.load(part_ptr + t0 + t, mask=t0 + t < tiles, other=0.0), axis=0))
    bits = tl.math.div_rn(peak, LIMIT).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 126 - ((bits & 0x7FFFFF) == 0).to(tl.int32)  # frexp's exponent, less one at 2**k
    e = tl.where(peak > 0, tl.minimum(tl.maximum(e, -126), 127), 0)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_tile(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, raw_ptr, low_ptr, stages, n, rt, lt, m, x_sn, x_sr, R, L, P, G, D,
    BITS: tl.constexpr, QBLOCK: tl.constexpr, MODE: tl.constexpr, OFFSET: tl.constexpr,
    STEPS: tl.constexpr, LEVELS: tl.constexpr, ZERO_CODE: tl.constexpr, FMT: tl.constexpr, WIDE: tl.constexpr,
    TOKEN_AXIS: tl.constexpr, WORD: tl.constexpr, MSB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Quantize and pack tile (rt, lt) of row n with the row multiplier m; WIDE (the speculative
    pass, m = 1): scales and zero points rounded to the format's mantissa with fp32's exponents
    (bits.round_up), the blocks' raw scales (and lows, asym) stored in place of scales and zeros.
    Returns the tile's largest block peak (as ``block_peaks``; 0 for masked blocks)."""
    r, r_ok, mask, x = _residual_tile(x_ptr, stages, n, rt, lt, x_sn, x_sr, R, L, D, TOKEN_AXIS, BLOCK_R, BLOCK_L)
    row = n * R + r  # outputs are contiguous [N, R, ...]
    xb = tl.reshape(x, (BLOCK_R, BLOCK_L // QBLOCK, QBLOCK))
    # m is a power of two (2^-126 .. 2^127), so 1 / m is a float and a value over m is its product
    # with it, rounded as the division: one division a program, not one a block
    inv_m = tl.math.div_rn(1.0, m)
    if MODE == 2:
        low = tl.min(xb, axis=2)
        high = tl.max(xb, axis=2)
        zero_rel = round_down(low * inv_m, FMT, WIDE)  # stored, relative to m
        zero = zero_rel * m
        raw = tl.math.div_rn(high - zero, STEPS)
        # masked elements are 0 and whole blocks (the block divides L), so their peaks are 0
        peak = tl.maximum(tl.math.div_rn(tl.max(tl.max(high - low, axis=1), axis=0), STEPS),
                          tl.max(tl.max(tl.abs(low), axis=1), axis=0))
    else:
        zero = tl.zeros((BLOCK_R, BLOCK_L // QBLOCK), tl.float32)
        raw = tl.math.div_rn(tl.max(tl.abs(xb), axis=2), STEPS)
        # a correctly rounded division by STEPS > 0 keeps the order of its dividends
        peak = tl.max(tl.max(raw, axis=1), axis=0)
    scale_rel = round_up(raw * inv_m, FMT, WIDE)
    scale = scale_rel * m
    g = lt * (BLOCK_L // QBLOCK) + tl.arange(0, BLOCK_L // QBLOCK)
    g_mask = r_ok[:, None] & (g < G)[None, :]
    sidx = row[:, None] * G + g[None, :]
    if WIDE:
        tl.store(raw_ptr + sidx, raw, mask=g_mask)
        if MODE == 2:
            tl.store(low_ptr + sidx, low, mask=g_mask)
    else:
        tl.store(scales_ptr + sidx, scale_rel.to(scales_ptr.dtype.element_ty), mask=g_mask)
        if MODE == 2:
            tl.store(zeros_ptr + sidx, zero_rel.to(zeros_ptr.dtype.element_ty), mask=g_mask)
    live = scale > 0
    p, f, inv = divisor_parts(tl.where(live, scale, 1.0))  # one division a block
    # x / scale as the twin divides: a code turns on a quotient of at least 1/2, where `quotient`
    # is exact; below 2^-80 both round to the same code. A block of scale 0 holds x == zero
    # only, so ZERO_CODE as its offset gives it that code.
    v = quotient(xb - zero[:, :, None], p[:, :, None], f[:, :, None], inv[:, :, None])
    v = v + tl.where(live, OFFSET, ZERO_CODE)[:, :, None]
    # clamped to the integers 0 .. LEVELS - 1 before rounding, as torch rounds then clamps
    code = nearest_int(tl.minimum(tl.maximum(v, 0.0), LEVELS - 1.0))
    code = tl.where(mask, tl.reshape(code, (BLOCK_R, BLOCK_L)), 0)
    if WORD % BITS == 0:  # every code in one word: a word is its PER codes shifted into place
        PER: tl.constexpr = WORD // BITS
        i = tl.arange(0, PER)
        if MSB:
            shift = WORD - (i + 1) * BITS
        else:
            shift = i * BITS
        # int32 fields that do not overlap: their sum is their OR (a 32-bit word's top field wraps
        # to the sign bit, as the int32 container holds it)
        word = tl.sum(tl.reshape(code, (BLOCK_R, BLOCK_L // PER, PER)) << shift[None, None, :], axis=2)
        w = lt * (BLOCK_L // PER) + tl.arange(0, BLOCK_L // PER)
        tl.store(codes_ptr + row[:, None] * P + w[None, :], word.to(codes_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & (w < P)[None, :])
    else:
        if WORD != 8:  # byte words: every shifted field fits 32 bits
            code = code.to(tl.int64)
        groups = tl.reshape(code, (BLOCK_R, BLOCK_L // WORD, WORD))
        w = lt * (BLOCK_L // WORD) + tl.arange(0, BLOCK_L // WORD)
        for k in tl.static_range(BITS):
            word = pack_word(groups, k, BITS, WORD, MSB)
            widx = w * BITS + k
            wmask = r_ok[:, None] & (widx < P)[None, :]
            if WORD == 32:
                word = tl.where(word >= 2147483648, word - 4294967296, word)
            tl.store(codes_ptr + row[:, None] * P + widx[None, :], word.to(codes_ptr.dtype.element_ty), mask=wmask)
    return peak


@triton.jit
def _settled(raw_ptr, low_ptr, scales_ptr, zeros_ptr, n, r, g, m, R, G, MODE: tl.constexpr, FMT: tl.constexpr):
    """The scales (and zero points) of rows r, block columns g of row n under the row's multiplier
    m, from the speculative pass's raw scales (and lows), stored; whether each block's scale and
    zero point are the values that pass quantized with (its codes then stand), [rows, columns]."""
    g_mask = (r < R)[:, None] & (g < G)[None, :]
    sidx = (n * R + r)[:, None] * G + g[None, :]
    raw = tl.load(raw_ptr + sidx, mask=g_mask, other=0.0)
    inv_m = tl.math.div_rn(1.0, m)
    # the speculative pass's raw scale is this pass's where the zero points agree (asym's raw
    # scale is over its zero point); where they do not, the tile is quantized again
    scale_rel = round_up(raw * inv_m, FMT, False)
    same = (scale_rel * m) == round_up(raw, FMT, True)
    if MODE == 2:
        low = tl.load(low_ptr + sidx, mask=g_mask, other=0.0)
        zero_rel = round_down(low * inv_m, FMT, False)
        same = same & ((zero_rel * m) == round_down(low, FMT, True))
        tl.store(zeros_ptr + sidx, zero_rel.to(zeros_ptr.dtype.element_ty), mask=g_mask)
    tl.store(scales_ptr + sidx, scale_rel.to(scales_ptr.dtype.element_ty), mask=g_mask)
    return same


@triton.jit
def _quantize_pack_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, raw_ptr, low_ptr, part_ptr, mult_ptr, stages, x_sn, x_sr, R, L, P,
    G, D, ROW_TILES,
    BITS: tl.constexpr, QBLOCK: tl.constexpr, MODE: tl.constexpr, OFFSET: tl.constexpr,
    STEPS: tl.constexpr, LEVELS: tl.constexpr, ZERO_CODE: tl.constexpr, FMT: tl.constexpr, PASS: tl.constexpr,
    LIMIT: tl.constexpr, TOKEN_AXIS: tl.constexpr,
    WORD: tl.constexpr, MSB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, SETTLE_TILES: tl.constexpr,
):
    """Quantize+pack over a grid (row tiles, N, L tiles). PASS 0 (ONE_PASS: fp32 scales, no
    multiplier): every tile quantized. PASS 1 (SPECULATE: scale formats with a row multiplier):
    every tile quantized as its row's multiplier will leave it unless its scale or zero point
    falls below the format's normal range there (what a power of two does not change), its raw
    scales (and lows) and its largest block peak (into part[n, tile]) stored. PASS 2 (SETTLE,
    over SETTLE_TILES row tiles a program): the row's multiplier from the peaks (one program
    stores it), each tile's scales (and zeros) from the raw ones, and a tile where any of them
    differs from what was speculated (rare: a block far below its row's peak) quantized again
    with the multiplier."""
    n = tl.program_id(1).to(tl.int64)
    lt = tl.program_id(2)
    if PASS == 2:
        m = _row_multiplier(part_ptr + n * ROW_TILES * tl.num_programs(2), ROW_TILES * tl.num_programs(2), LIMIT)
        tl.store(mult_ptr + n, m, mask=(tl.program_id(0) == 0) & (lt == 0))
        # the raw scales of the program's tiles in one load (many bytes in flight), a flag a tile
        first = tl.program_id(0) * SETTLE_TILES
        r = first * BLOCK_R + tl.arange(0, SETTLE_TILES * BLOCK_R)
        g = lt * (BLOCK_L // QBLOCK) + tl.arange(0, BLOCK_L // QBLOCK)
        same = _settled(raw_ptr, low_ptr, scales_ptr, zeros_ptr, n, r, g, m, R, G, MODE, FMT)
        tiles_same = tl.min(tl.reshape(same.to(tl.int32), (SETTLE_TILES, BLOCK_R * (BLOCK_L // QBLOCK))), axis=1)
        if tl.min(tiles_same, axis=0) == 0:
            for i in range(SETTLE_TILES):
                if tl.sum(tl.where(tl.arange(0, SETTLE_TILES) == i, tiles_same, 0), axis=0) == 0:
                    _quantize_tile(x_ptr, codes_ptr, scales_ptr, zeros_ptr, raw_ptr, low_ptr, stages, n, first + i,
                                   lt, m, x_sn, x_sr, R, L, P, G, D, BITS, QBLOCK, MODE, OFFSET, STEPS, LEVELS,
                                   ZERO_CODE, FMT, False, TOKEN_AXIS, WORD, MSB, BLOCK_R, BLOCK_L)
    else:
        rt = tl.program_id(0)
        peak = _quantize_tile(x_ptr, codes_ptr, scales_ptr, zeros_ptr, raw_ptr, low_ptr, stages, n, rt, lt, 1.0, x_sn,
                              x_sr, R, L, P, G, D, BITS, QBLOCK, MODE, OFFSET, STEPS, LEVELS, ZERO_CODE, FMT,
                              PASS == 1, TOKEN_AXIS, WORD, MSB, BLOCK_R, BLOCK_L)
        if PASS == 1:
            tl.store(part_ptr + n * ROW_TILES * tl.num_programs(2) + rt * tl.num_programs(2) + lt, peak)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scales_ptr, zeros_ptr, mult_ptr, out_ptr, stages, S, R, P, G, OUT_N,
    LAYOUT: tl.constexpr, D: tl.constexpr, EMULATE: tl.constexpr, PAIRS: tl.constexpr, LIMIT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tokens of one (batch, head) row n: codes [N, R, P], scales / zeros [N, R, G] (R: tokens or
    channels), decoded by tile.decode_tile, saturated and rounded once into out (rows OUT_N apart)."""
    n = tl.program_id(0).to(tl.int64)
    m = 1.0
    if LAYOUT.HAS_MULT:
        m = tl.load(mult_ptr + n)
    src = Source(codes_ptr + n * R * P, scales_ptr + n * R * G, zeros_ptr + n * R * G, m, None, S, P, G,
                 stage_rows(stages, n))
    s0 = tl.program_id(1) * BLOCK_S
    out = decode_tile(src, s0, S, LAYOUT, D, BLOCK_S, BLOCK_D, False, "exact", False)
    out = to_output(out, out_ptr.dtype.element_ty, LIMIT, EMULATE, PAIRS)  # saturated as qkv.dtypes.saturate
    s = s0 + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    mask = (s < S)[:, None] & (d < D)[None, :]
    # a streaming store: the output (a span's values, several to hundreds of MB) is not read back
    # by this kernel, and the hint made the span decode 0.4-5% faster on an H100 and an H200
    # (benchmarks/decode_store_hints.py)
    tl.store(out_ptr + n * OUT_N + s[:, None] * D + d[None, :], out, mask=mask, cache_modifier=".cs")


def quantize_pack_supports(x, q: AffineFormat, centroids=(), assignments=()) -> str | None:
    """Why the Triton kernel cannot run this case (None if it can); raises on malformed inputs."""
    check_quantize_args(x, q, centroids, assignments)
    if not is_pow2(q.block):
        return f"block {q.block} is not a power of two"
    if q.block > 1024:
        return f"block {q.block} is larger than 1024"
    if len(centroids) > LAUNCH_STAGES:
        return f"{len(centroids)} stages (at most {LAUNCH_STAGES} per launch)"
    return None


def _stage_args(centroids, assignments) -> tuple:
    """The kernels' ``stages`` argument (see tile.stage_rows): per stage the centroids (made
    contiguous), the assignments, their strides along N and the assignments' along S."""
    cents = [c.contiguous() for c in centroids]
    return tuple((c, a, c.stride(0), a.stride(0), a.stride(1)) for c, a in zip(cents, assignments))


def quantize_pack_triton(
    x: torch.Tensor, q: AffineFormat, centroids=(), assignments=(), *, tile: QuantizeTile | None = None
) -> QuantizedRows:
    """Triton twin of :func:`qkv.kernels.quantize.quantize_pack_torch`: x (any float dtype, rows
    with unit stride) is read as it is and the stages' centroids are gathered and subtracted in
    registers; only codes, scales and zeros are written. With a row multiplier (scale formats
    but fp32) two launches and one read of x: a speculative pass quantizes every tile as the
    multiplier will leave it (a power of two moves a scale without rounding it differently,
    unless it leaves the format's normal range) and notes the raw scales and the tiles' block
    peaks; a second pass works out each row's multiplier, stores the scales relative to it, and
    quantizes again only the tiles where a block's scale or zero point came out otherwise (no torch
    ops between the two). ``tile``: the launches (default: the device's, see
    :mod:`qkv.kernels.triton.tiles`); any tile gives the same results."""
    check_quantize_args(x, q, centroids, assignments)
    n, r, length = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    d = length if q.axis == "token" else r
    stages = _stage_args(centroids, assignments)
    tile = tile or tile_for("quantize", x.device, 0)
    block_l = max(min(triton.next_power_of_2(length), 512), q.block, q.pack.word_bits)
    groups = length // q.block
    p = q.pack.packed_len(length, q.bits)
    codes = torch.empty(n, r, p, dtype=q.pack.container, device=x.device)
    scales = torch.empty(n, r, groups, dtype=q.scale_dtype, device=x.device)
    zeros = torch.empty_like(scales) if q.has_zero else None
    block_r = max(1, min(64, tile.values // block_l))
    grid = (triton.cdiv(r, block_r), n, triton.cdiv(length, block_l))
    launch = dict(
        BITS=q.bits, QBLOCK=q.block, MODE=MODE_CODE[q.mode], OFFSET=q.offset, STEPS=q.steps, LEVELS=q.levels,
        ZERO_CODE=float(math.floor(q.offset)), FMT=FORMAT_CODE[q.scale], TOKEN_AXIS=q.axis == "token",
        LIMIT=max_finite(q.scale_dtype) * HEADROOM, WORD=q.pack.word_bits, MSB=q.pack.msb_first, BLOCK_R=block_r,
        BLOCK_L=block_l, num_warps=tile.warps, **EXACT_LAUNCH,
    )
    outputs = (x, codes, scales, scales if zeros is None else zeros)
    shape = (stages, x.stride(0), x.stride(1), r, length, p, groups, d, grid[0])
    if not q.has_mult:
        _quantize_pack_kernel[grid](*outputs, x, x, x, x, *shape, PASS=ONE_PASS, SETTLE_TILES=1, **launch)
        return QuantizedRows(codes, scales, zeros, None)
    raw = torch.empty(n, r, groups, dtype=torch.float32, device=x.device)
    low = torch.empty_like(raw) if q.has_zero else raw
    part = torch.empty(n, grid[0] * grid[2], dtype=torch.float32, device=x.device)
    mult = torch.empty(n, dtype=torch.float32, device=x.device)
    _quantize_pack_kernel[grid](*outputs, raw, low, part, mult, *shape, PASS=SPECULATE, SETTLE_TILES=1, **launch)
    settle = min(tile.settle_tiles, triton.next_power_of_2(grid[0]))
    _quantize_pack_kernel[(triton.cdiv(grid[0], settle), n, grid[2])](
        *outputs, raw, low, part, mult, *shape, PASS=SETTLE, SETTLE_TILES=settle, **launch)
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


def dequantize_triton(rows, q, tokens, centroids, assignments, out_dtype=torch.float32, out=None, *,
                      tile: DequantizeTile | None = None):
    """Triton twin of :func:`qkv.kernels.quantize.dequantize_torch` (one pass, all stages); ``out``
    may be a view whose rows are contiguous (a slice of a longer buffer along the tokens). ``tile``:
    the launch (default: the device's, see :mod:`qkv.kernels.triton.tiles`)."""
    n, d = rows.codes.shape[0], rows_dim(rows, q)
    if out is None:
        out = torch.empty(n, tokens, d, dtype=out_dtype, device=rows.codes.device)
    layout = code_layout(q, d, rows.mult, centroids, assignments)
    tile = tile or tile_for("dequantize", out.device, 0)
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(128, (tile.fast_values if layout.FAST and layout.TOKEN_AXIS else tile.values) // block_d))
    if layout.FAST and not layout.TOKEN_AXIS:
        block_s = max(block_s, MIN_TOKEN_TILE)  # whole packed words of every channel per tile
    _dequantize_kernel[(n, triton.cdiv(tokens, block_s))](
        rows.codes, rows.scales, rows.scales if rows.zeros is None else rows.zeros,
        rows.codes if rows.mult is None else rows.mult, out, _stage_args(centroids, assignments),
        tokens, tokens if q.axis == "token" else d, rows.codes.shape[-1], rows.scales.shape[-1], out.stride(0),
        LAYOUT=layout, D=d, EMULATE=out.device.type != "cuda", PAIRS=pairs_a_thread(block_s * block_d, tile.warps),
        LIMIT=0.0 if out_dtype == torch.float32 else max_finite(out_dtype),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=tile.warps, **EXACT_LAUNCH,
    )
    return out
