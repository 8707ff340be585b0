"""Triton attention that reads compressed KV spans directly, twin of qkv/kernels/attention.py.

One launch (attention_kernel.py) runs a FlashAttention-style loop for a block of queries of one
(batch, head) over every segment of the history: the compressed spans first, then the
full-precision segments (sink, tail, current chunk). A span's key and value tiles are decoded in
registers (codes unpacked, scaled, every stage's centroid row added, full-precision tokens
selected) right before the products; no decompressed K or V is written to global memory. Spans
are passed as a table of addresses and sizes (one row per span, records.py's ``SPAN_FIELDS``;
each span's record is built once and kept in its :class:`SpanPlan`), so the number of spans is a
runtime value and one compiled kernel serves every history length.

Layouts read directly: per-token or per-channel blocks, 1-8 bit codes in either packing, any scale
format, up to ``LAUNCH_STAGES`` additive smoothing stages, float-cast spans, and Hadamard-rotated
spans: H is symmetric and orthonormal, so ``q . (H r) = (H q) . r`` and
``sum_j p_j H r_j = H sum_j p_j r_j``; the queries are rotated once (H q rounded to q's dtype,
one launch: ``hadamard_triton``) and the spans' output once instead of every key and value. A span of another layout is
decompressed on its own and attended to by a launch of its own; partial results are merged by
log-sum-exp (:func:`attention_triton`).
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.errors import OutOfResources

from qkv import kernels
from qkv.kernels.attention import check_attention, default_scale
from qkv.kernels.segments import CompressedSpan, DenseKV, SpanPlan, kv_meta
from qkv.kernels.triton.attention_kernel import attention_kernel
from qkv.kernels.triton.hadamard import hadamard_triton
from qkv.kernels.triton.records import (
    DENSE_FIELDS,
    NO_SPANS,
    SPAN_FIELDS,
    TL_DTYPES,
    SpanRecord,
    TensorLayout,
    _aligned,
    device_rows,
    span_record,
)
from qkv.kernels.triton.tiles import tile_for

LOG2E = 1.4426950408889634



# -- host side ---------------------------------------------------------------------------------


def span_support(span: CompressedSpan, q: torch.Tensor) -> str | None:
    """Why the kernel cannot read ``span`` directly (None if it can); such a span is decompressed
    on its own and attended to by a separate launch."""
    rec = span_record_of(span)
    if rec.unsupported:
        return rec.unsupported
    return None if rec.dtype == q.dtype else f"the span was compressed from {rec.dtype}, the queries are {q.dtype}"


def span_record_of(span: CompressedSpan) -> SpanRecord:
    """The kernels' record of a span, from its data and formats (see records.py)."""
    return span_record(span.ckv)


def _dense_record(seg: DenseKV, keep: list) -> list[int]:
    """Fields (DENSE_FIELDS order) of full-precision keys/values; a tensor whose address or strides
    are not multiples of 16 bytes (a rare view) is copied, so the kernel loads rows as vectors."""

    def aligned(t: torch.Tensor) -> torch.Tensor:
        ok = t.stride(-1) == 1 and _aligned(t.data_ptr(), *(st * t.itemsize for st in t.stride()[:3]))
        return t if ok else t.clone(memory_format=torch.contiguous_format)

    k, v = aligned(seg.k), aligned(seg.v)
    keep.extend((k, v))
    return [k.data_ptr(), v.data_ptr(), k.shape[2], *k.stride()[:3], *v.stride()[:3]]


def _launch(q, scale, h_kv, span_rows, dense_rows, layouts, out_dtype, want_lse, tiles=None):
    """One kernel launch over the spans of ``span_rows`` (all of ``layouts``) and the full-precision
    segments of ``dense_rows``: (out [B, H, Sq, D] in ``out_dtype``, lse [B, H, Sq] or None).
    ``tiles``: the tile
    configurations to try in order (default: the device's, :mod:`qkv.kernels.triton.tiles`)."""
    b, h, sq, d = q.shape
    device = q.device
    span_table = device_rows(span_rows or [[0] * len(SPAN_FIELDS)], device)
    dense_table = device_rows(dense_rows or [[0] * len(DENSE_FIELDS)], device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(b, sq, h, d, dtype=out_dtype, device=device).transpose(1, 2)  # [B, H, Sq, D] view
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=device) if want_lse else out
    emulate = device.type != "cuda"
    k_layout, v_layout = layouts if layouts is not None else NO_SPANS
    if tiles is None:
        tiles = tile_for("attention", device, sq).order
    for i, (block_m, block_n, warps, span_stages, dense_stages) in enumerate(tiles):
        try:
            attention_kernel[(triton.cdiv(sq, block_m), b * h)](
                q, out, lse, dense_table, span_table,
                len(dense_rows), len(span_rows), h, h_kv, sq,
                *q.stride()[:3], *out.stride()[:3], scale * LOG2E,
                D=d, BLOCK_M=block_m, BLOCK_N=block_n, SPAN_STAGES=span_stages, DENSE_STAGES=dense_stages,
                KV_T=TL_DTYPES[q.dtype],
                DENSE_MULT=16 // q.itemsize,
                DOT_BF16=q.dtype == torch.bfloat16, OUT_BF16=out_dtype == torch.bfloat16,
                EMULATE=emulate, HAS_SPANS=bool(span_rows), WRITE_LSE=want_lse,
                K=k_layout, V=v_layout,
                num_warps=warps,
            )
        except OutOfResources:  # raised before the launch: nothing ran
            if i == len(tiles) - 1:
                raise
            continue
        return out, (lse if want_lse else None)


def attention_supports(q, segments, scale=None) -> str | None:
    """Why the kernel cannot run this call at all (None if it can; spans it cannot read directly
    are decompressed one by one, see :func:`span_support`)."""
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"queries are {q.dtype}; the kernel multiplies bf16/fp16 on tensor cores"
    d = q.shape[-1]
    if d not in (16, 32, 64, 128, 256):
        return f"head_dim {d} is not a power of two in [16, 256]"
    for seg in segments:
        if isinstance(seg, DenseKV) and seg.k.dtype != q.dtype:
            return f"a full-precision segment is {seg.k.dtype}, the queries are {q.dtype}"
    return None


def _rotated_launch(q, scale, h_kv, span_rows, layouts, tiles=None):
    """(out fp32, lse) over Hadamard-rotated spans: H is symmetric and orthonormal, so
    q . (H r) = (H q) . r and sum_j p_j H r_j = H sum_j p_j r_j. The kernel reads the stored
    (rotated) codes with the rotated queries H q, rounded to q's dtype as the keys' values are
    (the error this adds: benchmarks/rotated_query_rounding.py), and the output is rotated back
    once."""
    k_layout, v_layout = layouts
    if k_layout.ROT:
        q = hadamard_triton(q)
    out, lse = _launch(q, scale, h_kv, span_rows, [], layouts, torch.float32, True, tiles)
    return (kernels.hadamard(out) if v_layout.ROT else out), lse


def attention_triton(q: torch.Tensor, segments, scale: float | None = None, *, tiles=None) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.attention.attention_torch`: [B, H, Sq, D] in q's dtype.
    ``tiles``: (BLOCK_M, BLOCK_N, warps, span stages, dense stages) configurations to try in order
    (default: the device's, :mod:`qkv.kernels.triton.tiles`; a benchmark sweep passes one at a time).

    The spans of the first layout and the full-precision segments go through one launch; spans of
    another layout each get their own launch (Hadamard-rotated ones with rotated queries, see
    :func:`_rotated_launch`), and spans the kernel cannot read are decompressed one at a time and
    attended to as full-precision keys; partial results are merged by log-sum-exp.
    """
    check_attention(q, segments)
    scale = default_scale(q, scale)
    segments = [seg for seg in segments if not isinstance(seg, SpanPlan) or seg.spans]
    h_kv = kv_meta(segments[0])[0][1]
    keep: list = []  # every tensor whose address is in a table, alive until the launches are queued
    dense = [_dense_record(s, keep) for s in segments if isinstance(s, DenseKV) and s.tokens]
    groups: dict[tuple[TensorLayout, TensorLayout], list[list[int]]] = {}
    fallback = []
    for seg in segments:
        plan = seg if isinstance(seg, SpanPlan) else SpanPlan([seg]) if isinstance(seg, CompressedSpan) else None
        for sp in plan.spans if plan is not None else ():
            rec = plan.record(sp, span_record_of)
            if rec.unsupported or rec.dtype != q.dtype:
                fallback.append(sp)
                continue
            keep.append(rec)
            groups.setdefault(rec.layouts, []).append([rec.tokens, sp.skip, *rec.fields])
    rotated = [(layouts, rows) for layouts, rows in groups.items() if layouts[0].ROT or layouts[1].ROT]
    plain = [(layouts, rows) for layouts, rows in groups.items() if not (layouts[0].ROT or layouts[1].ROT)]
    parts = [(layouts, rows, dense if i == 0 else []) for i, (layouts, rows) in enumerate(plain)]
    if not parts and dense:
        parts = [(None, [], dense)]
    if len(parts) == 1 and not rotated and not fallback:
        layouts, rows, dense_rows = parts[0]
        return _launch(q, scale, h_kv, rows, dense_rows, layouts, q.dtype, False, tiles=tiles)[0]
    state = None
    for part in _partials(q, scale, h_kv, parts, rotated, fallback, tiles):
        state = kernels.merge_partials(state, part, backend="triton")
    return state[0].to(q.dtype)


def _partials(q, scale, h_kv, parts, rotated, fallback, tiles):
    """The partial results (out fp32, lse) of :func:`attention_triton`'s launches, one at a time."""
    for layouts, rows, dense_rows in parts:
        yield _launch(q, scale, h_kv, rows, dense_rows, layouts, torch.float32, True, tiles=tiles)
    for layouts, rows in rotated:
        yield _rotated_launch(q, scale, h_kv, rows, layouts, tiles)
    for sp in fallback:  # decompressed one at a time: never the whole history at once
        keep = []
        row = _dense_record(DenseKV(*sp.materialize()), keep)
        yield _launch(q, scale, h_kv, [], [row], None, torch.float32, True, tiles=tiles)
