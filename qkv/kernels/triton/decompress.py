"""Decompression of many stored spans in one launch, twin of
:func:`qkv.kernels.segments.decompress_spans_torch`.

The staged attention decompresses the history a group of consecutive spans at a time into one
buffer. Span by span that is two launches and the host work of a call per span, in every layer and
every forward: with a span per generated chunk, thousands per chunk. Here the spans' records (the
span table of records.py, built once per set of spans and kept in its :class:`SpanPlan`) are read by
one launch for K and V together: each program decodes one work item (a piece of one span) with
``tile.decode_tile`` in the reference's arithmetic ("exact"), saturates and rounds it to the
spans' dtype once, and writes it at the item's place among the spans' live keys; its K and V tile
by tile, or (``DecompressTile.split``) K and V by programs of their own, twice the programs with
half the chain of dependent loads each. A Hadamard-rotated tensor's tile is rotated back in fp32
before its rounding, on tensor cores as the Hadamard kernel rotates a tile of rows
(``bits.hadamard_rows``): the values of :func:`qkv.kernels.decompress` on the Triton backend, which
differ from the reference's butterfly by its summation order (an output rounding apart at most);
or, where the caller asks for the stored basis (``rotated``), left rotated, bit for bit (its
full-precision tokens, stored unrotated, rotated into it on tensor cores: within an output
rounding of the reference's fp32 rotation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkv.dtypes import max_finite
from qkv.kernels.segments import SpanPlan
from qkv.kernels.triton.attention import span_record_of
from qkv.kernels.triton.attention_kernel import S_K, S_LEN, S_TOKENS, S_V
from qkv.kernels.triton.bits import EXACT_LAUNCH, hadamard_rows, pairs_a_thread, to_output
from qkv.kernels.triton.decode import plan_table
from qkv.kernels.triton.decode_kernel import I_AT, I_HI, I_LEN, I_LO, I_SPAN
from qkv.kernels.triton.hadamard import TILE_MAX_D
from qkv.kernels.triton.launch import Launcher
from qkv.kernels.triton.records import TL_DTYPES
from qkv.kernels.triton.tile import decode_tile, record_source
from qkv.kernels.triton.tiles import DecompressTile, tile_for



@triton.jit
def _write(out_ptr, x, rows, ok, d, LIMIT: tl.constexpr, EMULATE: tl.constexpr, PAIRS: tl.constexpr):
    """x [BLOCK_N, D] fp32 saturated to the output's finite range and rounded once into its rows."""
    x = to_output(x, out_ptr.dtype.element_ty, LIMIT, EMULATE, PAIRS)
    tl.store(out_ptr + rows[:, None] + d[None, :], x, mask=ok[:, None])


@triton.jit
def _tile_rows(src, out_ptr, out_ss, t0, lo, hi, at, S, L: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
               LIMIT: tl.constexpr, EMULATE: tl.constexpr, PAIRS: tl.constexpr, ROT: tl.constexpr):
    """The tile of keys t0 .. t0 + BLOCK_N of one tensor of a span (``src``: its record source,
    layout ``L``), those in lo .. hi decoded and written from row ``at`` (for key lo) of
    ``out_ptr`` (its (batch, KV head) row, row stride ``out_ss``). ROT: the tensor's quantized tokens are
    rotated back (x H / sqrt(D); ``L.ROT``: one Hadamard stage), its full-precision tokens, stored
    unrotated, written as they are; else a rotated tensor is left in its stored basis, those
    tokens rotated into it."""
    tok = t0 + tl.arange(0, BLOCK_N)
    x = decode_tile(src, t0, S, L, D, BLOCK_N, D, L.HAS_FP, "exact", False)
    # full-precision tokens are stored unrotated: they turn only into the stored basis
    if ROT and L.HAS_FP:
        x = hadamard_rows(x, tok < src.quantized, D, EMULATE)
    elif ROT:
        x = hadamard_rows(x, None, D, EMULATE)
    elif L.ROT and L.HAS_FP:
        x = hadamard_rows(x, tok >= src.quantized, D, EMULATE)
    _write(out_ptr, x, (at + (tok - lo)) * out_ss, (tok >= lo) & (tok < hi), tl.arange(0, D), LIMIT, EMULATE, PAIRS)


@triton.jit
def decompress_kernel(
    span_ptr, item_ptr, k_out, v_out, HKV, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,
    D: tl.constexpr, BLOCK_N: tl.constexpr, KV_T: tl.constexpr, LIMIT: tl.constexpr, PAIRS: tl.constexpr,
    EMULATE: tl.constexpr, SPLIT: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    K_ROT: tl.constexpr, V_ROT: tl.constexpr,
):
    """Work item ``program_id(0)`` of (batch, KV head) row ``program_id(1)``: its keys' K and V,
    tile by tile, or with SPLIT its K (``program_id(2)`` 0) or its V (1) alone; K_ROT / V_ROT:
    rotated back (see :func:`_tile_rows`)."""
    item = item_ptr + tl.program_id(0) * I_LEN
    n = tl.program_id(1).to(tl.int64)
    b, h = n // HKV, n % HKV
    rec = span_ptr + tl.load(item + I_SPAN) * S_LEN
    lo = tl.load(item + I_LO).to(tl.int32)
    hi = tl.load(item + I_HI).to(tl.int32)
    at = tl.load(item + I_AT)
    S = tl.load(rec + S_TOKENS).to(tl.int32)
    k_row, v_row = k_out + b * k_sb + h * k_sh, v_out + b * v_sb + h * v_sh
    first = lo // BLOCK_N * BLOCK_N
    if SPLIT:  # one tensor a program: the loop holds one tile's chain of loads, not two
        if tl.program_id(2) == 0:
            kt = record_source(rec + S_K, n, D, K, KV_T)
            for t0 in range(first, hi, BLOCK_N):
                _tile_rows(kt, k_row, k_ss, t0, lo, hi, at, S, K, D, BLOCK_N, LIMIT, EMULATE, PAIRS, K_ROT)
        else:
            vt = record_source(rec + S_V, n, D, V, KV_T)
            for t0 in range(first, hi, BLOCK_N):
                _tile_rows(vt, v_row, v_ss, t0, lo, hi, at, S, V, D, BLOCK_N, LIMIT, EMULATE, PAIRS, V_ROT)
    else:
        kt = record_source(rec + S_K, n, D, K, KV_T)
        vt = record_source(rec + S_V, n, D, V, KV_T)
        for t0 in range(first, hi, BLOCK_N):
            _tile_rows(kt, k_row, k_ss, t0, lo, hi, at, S, K, D, BLOCK_N, LIMIT, EMULATE, PAIRS, K_ROT)
            _tile_rows(vt, v_row, v_ss, t0, lo, hi, at, S, V, D, BLOCK_N, LIMIT, EMULATE, PAIRS, V_ROT)


# launched for every span group of a staged attention call: without Triton's per-launch binding
launch_decompress = Launcher(decompress_kernel)


def decompress_spans_supports(plan: SpanPlan, k_out: torch.Tensor, v_out: torch.Tensor,
                              rotated: tuple[bool, bool] = (False, False)) -> str | None:
    """Why the kernel cannot decompress ``plan`` (None if it can)."""

    def check():
        d = plan.meta[0][3] if plan.meta else 0
        for sp in plan.spans:
            rec = plan.record(sp, span_record_of)
            if rec.unsupported:
                return rec.unsupported
            if d > TILE_MAX_D and any(lay.ROT and (lay.HAS_FP or not r) for lay, r in zip(rec.layouts, rotated)):
                return f"a span is Hadamard-rotated at head_dim {d} (rotated back in tiles up to {TILE_MAX_D})"
        if d & (d - 1):
            return f"head_dim {d} is not a power of two"
        return None

    return plan.table(("decompress support", rotated), check)


def decompress_spans_triton(plan: SpanPlan, k_out: torch.Tensor, v_out: torch.Tensor,
                            rotated: tuple[bool, bool] = (False, False), *, tile: DecompressTile | None = None) -> None:
    """Triton twin of :func:`qkv.kernels.segments.decompress_spans_torch` (checked arguments):
    one launch per layout among the spans (usually one), K and V together. ``tile``: the launch
    (default: the device's, see :mod:`qkv.kernels.triton.tiles`)."""
    if not plan.spans:
        return
    tile = tile or tile_for("decompress", k_out.device, 0)
    table = plan_table(plan, k_out.device, tile.piece)
    b, h, _, d = k_out.shape
    dtype = k_out.dtype
    for g in table.groups:
        if not g.n_items:
            continue
        k_layout, v_layout = g.layouts
        launch_decompress[(g.n_items, b * h, 2 if tile.split else 1)](
            g.table, g.items, k_out, v_out, h, *k_out.stride()[:3], *v_out.stride()[:3],
            D=d, BLOCK_N=tile.block_n, KV_T=TL_DTYPES[dtype],
            LIMIT=0.0 if dtype == torch.float32 else max_finite(dtype), PAIRS=pairs_a_thread(tile.block_n * d, tile.warps),
            EMULATE=k_out.device.type != "cuda", SPLIT=tile.split,
            K=k_layout, V=v_layout, K_ROT=k_layout.ROT and not rotated[0],
            V_ROT=v_layout.ROT and not rotated[1], num_warps=tile.warps, **EXACT_LAUNCH,
        )
