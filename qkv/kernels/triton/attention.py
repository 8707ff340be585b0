"""Triton attention that reads compressed KV spans directly, twin of qkv/kernels/attention.py.

One launch (attention_kernel.py) runs a FlashAttention-style loop for a block of queries of one
(batch, head) over every segment of the history: the compressed spans first, then the
full-precision segments (sink, tail, current chunk). A span's key and value tiles are decoded in
registers (codes unpacked, scaled, every stage's centroid row added, full-precision tokens
selected) right before the products; no decompressed K or V is written to global memory. Spans
are passed as a table of addresses and sizes (one row per span, ``SPAN_FIELDS``), so the number
of spans is a runtime value and one compiled kernel serves every history length.

Layouts read directly: per-token or per-channel blocks, 1-8 bit codes in either packing, any scale
format, up to ``LAUNCH_STAGES`` additive smoothing stages, float-cast spans, and Hadamard-rotated
spans: H is symmetric and orthonormal, so ``q . (H r) = (H q) . r`` and
``sum_j p_j H r_j = H sum_j p_j r_j``; the host rotates the queries once (H q in two bf16 parts)
and the spans' output once instead of every key and value. A span of another layout is
decompressed on its own and attended to by a launch of its own; partial results are merged by
log-sum-exp (:func:`attention_triton`).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from einops import rearrange
from triton.runtime.errors import OutOfResources

from qkv import kernels
from qkv.errors import ShapeError
from qkv.kernels.attention import CompressedSpan, DenseKV, check_attention, default_scale
from qkv.kernels.triton.attention_kernel import attention_kernel
from qkv.kernels.triton.bits import LAUNCH_STAGES
from qkv.format import Undo


# one row of the span table: the span's size, then these fields for its keys, then for its values
TENSOR_FIELDS = (
    "codes", "scales", "zeros", "mult", "fp", "quantized", "words", "groups", "fp_len",
    "c0", "c1", "c2", "c3", "c_stride0", "c_stride1", "c_stride2", "c_stride3",
    "a0", "a1", "a2", "a3", "a_stride0", "a_stride1", "a_stride2", "a_stride3",
)
SPAN_FIELDS = ("tokens", "skip", *(f"k.{f}" for f in TENSOR_FIELDS), *(f"v.{f}" for f in TENSOR_FIELDS))
DENSE_FIELDS = ("k", "v", "tokens", "k_stride_b", "k_stride_h", "k_stride_s", "v_stride_b", "v_stride_h", "v_stride_s")
LOG2E = 1.4426950408889634

# Tile sizes: (BLOCK_M queries, BLOCK_N keys, warps, software-pipelining stages of the span loop
# and of the full-precision loop), in order of preference: a layout whose kernel needs more shared
# memory than the GPU has (deep smoothing, pipelined) takes the next. On a GPU, the fastest of
# benchmarks/bench_attention.py's sweep on an H100 (its "tiles" rows) first; the interpreter (no
# GPU) uses small tiles so that CPU tests stay fast.
GPU_TILES = ((256, 64, 8, 3, 3), (256, 64, 8, 2, 2), (128, 128, 8, 3, 3), (128, 64, 8, 2, 2))
INTERPRETER_TILES = ((16, 16, 4, 1, 1),)

TL_DTYPES = {
    torch.uint8: tl.uint8, torch.int8: tl.int8, torch.int16: tl.int16, torch.int32: tl.int32,
    torch.int64: tl.int64, torch.float32: tl.float32, torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16, torch.float8_e4m3fn: tl.float8e4nv,
}


# -- host side ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """The compile-time description of one compressed tensor (the kernel's K_* / V_* constants)."""

    CAST: bool = True
    BITS: int = 2
    QBLOCK: int = 16
    OFFSET: float = 0.0
    HAS_ZERO: bool = False
    HAS_MULT: bool = False
    TOKEN_AXIS: bool = True
    FAST: bool = False
    WORD: int = 8
    MSB: bool = True
    STAGES: int = 0
    ROT: bool = False
    CODE_T: torch.dtype = torch.bfloat16
    SCALE_T: torch.dtype = torch.float32
    CENT_T: torch.dtype = torch.bfloat16
    A_T: tuple[torch.dtype, ...] = (torch.uint8,) * LAUNCH_STAGES
    VEC: bool = False
    WORDS_MULT: int = 1
    HAS_FP: bool = False

    def constexprs(self, prefix: str) -> dict:
        skip = ("A_T", "ROT")  # the host undoes rotations (attention_triton)
        out = {f"{prefix}_{f.name}": getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        for key in ("CODE_T", "SCALE_T", "CENT_T"):
            out[f"{prefix}_{key}"] = TL_DTYPES[out[f"{prefix}_{key}"]]
        out.update({f"{prefix}_A{i}_T": TL_DTYPES[t] for i, t in enumerate(self.A_T)})
        return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    return rearrange(t, "b h ... -> (b h) ...")


def tensor_support(name: str, ct, q: torch.Tensor) -> str | None:
    """Why the kernel cannot decode this compressed tensor (None if it can)."""
    if ct.dtype != q.dtype:
        return f"{name} was compressed from {ct.dtype}, the queries are {q.dtype}"
    if ct.format.undo is Undo.ADD and len(ct.stages) > LAUNCH_STAGES:
        return f"{name}: {len(ct.stages)} smoothing stages (the kernel adds at most {LAUNCH_STAGES})"
    if ct.format.undo is Undo.ROTATE and len(ct.stages) != 1:
        return f"{name}: {len(ct.stages)} Hadamard stages (the kernel undoes one)"
    return None


def span_support(span: CompressedSpan, q: torch.Tensor) -> str | None:
    """Why the kernel cannot read ``span`` directly (None if it can); such a span is decompressed
    on its own and attended to by a separate launch."""
    for name, ct in (("k", span.ckv.k), ("v", span.ckv.v)):
        reason = tensor_support(name, ct, q)
        if reason is not None:
            return reason
    return None


def _aligned(*byte_values: int) -> bool:
    """Whether every address / byte stride is a multiple of 16 (0: absent or a broadcast)."""
    return all(v % 16 == 0 for v in byte_values)


def _tensor_record(ct, keep: list) -> tuple[list[int], TensorLayout]:
    """(fields in TENSOR_FIELDS order, layout) of one compressed tensor; ``keep`` holds every tensor
    whose address is recorded until the launch is queued."""

    def addr(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.contiguous()
        keep.append(t)
        return t.data_ptr()

    b, h, s, d = ct.shape
    fmt = ct.format
    quant = fmt.codes
    s_q = ct.quantized_tokens
    fp = addr(ct.fp_tokens)
    if fmt.cast is not None:
        fields = [addr(ct.codes), 0, 0, 0, fp, s_q, d, 0, s - s_q] + [0] * 16
        size = fmt.cast_dtype.itemsize
        vec = _aligned(fields[0], fp, d * size)
        return fields, TensorLayout(
            CAST=True, CODE_T=fmt.cast_dtype, VEC=vec, WORDS_MULT=16 // size, HAS_FP=s_q < s
        )
    packer = quant.pack
    per = packer.word_bits // quant.bits
    # whole codes per word, and per-token blocks that tile the row in powers of two, or per-channel
    # rows read a word at a time (every key tile, a power of two, then holds whole words)
    min_tile = min(t[1] for t in GPU_TILES + INTERPRETER_TILES)
    fast = packer.word_bits % quant.bits == 0 and (
        (quant.axis == "token" and d % per == 0 and d % quant.block == 0 and quant.block & (quant.block - 1) == 0)
        or (quant.axis == "channel" and per & (per - 1) == 0 and per <= min_tile)
    )
    cents, assigns = [], []
    if fmt.undo is Undo.ADD and s_q:
        for i, stage in enumerate(ct.stages):
            cents.append(_flat(stage.centroids).contiguous())
            a = ct.stage_assignments(i)
            assigns.append(a if a.stride(1) == 1 else a.contiguous())
    keep.extend(cents + assigns)
    pad = [0] * (LAUNCH_STAGES - len(cents))
    fields = [
        addr(ct.codes), addr(ct.scales), addr(ct.zeros), addr(ct.scale_mult), fp, s_q,
        ct.codes.shape[-1] if s_q else 0, ct.scales.shape[-1] if s_q else 0, s - s_q,
        *(c.data_ptr() for c in cents), *pad, *(c.shape[1] * d for c in cents), *pad,
        *(a.data_ptr() for a in assigns), *pad, *(a.stride(0) for a in assigns), *pad,
    ]
    words = fields[6] * packer.container.itemsize
    vec = _aligned(fields[0], fp, words, *fields[9:13], *(c.stride(0) * c.itemsize for c in cents),
                   *fields[17:21], *(a.stride(0) * a.itemsize for a in assigns))
    layout = TensorLayout(
        VEC=vec, WORDS_MULT=16 // packer.container.itemsize, HAS_FP=s_q < s, CAST=False, BITS=quant.bits,
        QBLOCK=quant.block, OFFSET=quant.offset, HAS_ZERO=quant.has_zero,
        HAS_MULT=ct.scale_mult is not None, TOKEN_AXIS=quant.axis == "token", FAST=fast,
        WORD=packer.word_bits, MSB=packer.msb_first, STAGES=len(cents),
        ROT=fmt.undo is Undo.ROTATE, CODE_T=packer.container, SCALE_T=quant.scale_dtype,
        CENT_T=cents[0].dtype if cents else torch.bfloat16,
        A_T=tuple(a.dtype for a in assigns) + (torch.uint8,) * len(pad),
    )
    return fields, layout


def _span_record(span: CompressedSpan, keep: list) -> tuple[list[int], tuple[TensorLayout, TensorLayout]]:
    k_fields, k_layout = _tensor_record(span.ckv.k, keep)
    v_fields, v_layout = _tensor_record(span.ckv.v, keep)
    return [span.ckv.k.shape[2], span.skip, *k_fields, *v_fields], (k_layout, v_layout)


def _dense_record(seg: DenseKV, keep: list) -> list[int]:
    """Fields (DENSE_FIELDS order) of full-precision keys/values; a tensor whose address or strides
    are not multiples of 16 bytes (a rare view) is copied, so the kernel loads rows as vectors."""

    def aligned(t: torch.Tensor) -> torch.Tensor:
        ok = t.stride(-1) == 1 and _aligned(t.data_ptr(), *(st * t.itemsize for st in t.stride()[:3]))
        return t if ok else t.clone(memory_format=torch.contiguous_format)

    k, v = aligned(seg.k), aligned(seg.v)
    keep.extend((k, v))
    return [k.data_ptr(), v.data_ptr(), k.shape[2], *k.stride()[:3], *v.stride()[:3]]


def _launch(q, scale, h_kv, span_rows, dense_rows, layouts, out_dtype, want_lse, q_lo=None):
    """One kernel launch over the spans of ``span_rows`` (all of ``layouts``) and the full-precision
    segments of ``dense_rows``: (out [B, H, Sq, D] in ``out_dtype``, lse [B, H, Sq] or None).
    ``q_lo``: the low part of the queries (q + q_lo, same strides as q)."""
    b, h, sq, d = q.shape
    device = q.device
    span_table = torch.tensor(span_rows or [[0] * len(SPAN_FIELDS)], dtype=torch.int64).to(device)
    dense_table = torch.tensor(dense_rows or [[0] * len(DENSE_FIELDS)], dtype=torch.int64).to(device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if q_lo is not None and q_lo.stride() != q.stride():
        raise ShapeError(f"q_lo has strides {q_lo.stride()}, q has {q.stride()}")
    out = torch.empty(b, sq, h, d, dtype=out_dtype, device=device).transpose(1, 2)  # [B, H, Sq, D] view
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=device) if want_lse else out
    emulate = device.type != "cuda"
    k_layout, v_layout = layouts if layouts is not None else (TensorLayout(), TensorLayout())
    tiles = INTERPRETER_TILES if emulate else GPU_TILES
    for i, (block_m, block_n, warps, span_stages, dense_stages) in enumerate(tiles):
        try:
            attention_kernel[(triton.cdiv(sq, block_m), b * h)](
                q, q if q_lo is None else q_lo, out, lse, dense_table, span_table,
                len(dense_rows), len(span_rows), h, h_kv, sq,
                *q.stride()[:3], *out.stride()[:3], scale * LOG2E,
                D=d, BLOCK_M=block_m, BLOCK_N=block_n, SPAN_STAGES=span_stages, DENSE_STAGES=dense_stages,
                SPLIT_Q=q_lo is not None, KV_T=TL_DTYPES[q.dtype],
                DENSE_MULT=16 // q.itemsize,
                DOT_BF16=q.dtype == torch.bfloat16, OUT_BF16=out_dtype == torch.bfloat16,
                EMULATE=emulate, HAS_SPANS=bool(span_rows), WRITE_LSE=want_lse,
                **k_layout.constexprs("K"), **v_layout.constexprs("V"),
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


def _rotated_launch(q, scale, h_kv, span_rows, layouts):
    """(out fp32, lse) over Hadamard-rotated spans: H is symmetric and orthonormal, so
    q . (H r) = (H q) . r and sum_j p_j H r_j = H sum_j p_j r_j. The kernel reads the stored
    (rotated) codes with the rotated queries H q, passed in two parts so that the scores are as
    exact as q . k, and the output is rotated back once."""
    k_layout, v_layout = layouts
    q_lo = None
    if k_layout.ROT:
        rotated = kernels.hadamard(q.float())
        q = rotated.to(q.dtype)
        q_lo = (rotated - q.float()).to(q.dtype)
    out, lse = _launch(q, scale, h_kv, span_rows, [], layouts, torch.float32, True, q_lo)
    return (kernels.hadamard(out) if v_layout.ROT else out), lse


def attention_triton(q: torch.Tensor, segments, scale: float | None = None) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.attention.attention_torch`: [B, H, Sq, D] in q's dtype.

    The spans of the first layout and the full-precision segments go through one launch; spans of
    another layout each get their own launch (Hadamard-rotated ones with rotated queries, see
    :func:`_rotated_launch`), and spans the kernel cannot read are decompressed one at a time and
    attended to as full-precision keys; partial results are merged by log-sum-exp.
    """
    check_attention(q, segments)
    scale = default_scale(q, scale)
    h_kv = segments[0].k.shape[1] if isinstance(segments[0], DenseKV) else segments[0].ckv.k.shape[1]
    keep: list = []  # every tensor whose address is in a table, alive until the launches are queued
    dense = [_dense_record(s, keep) for s in segments if isinstance(s, DenseKV) and s.tokens]
    groups: dict[tuple[TensorLayout, TensorLayout], list[list[int]]] = {}
    fallback = []
    for sp in segments:
        if isinstance(sp, CompressedSpan):
            if span_support(sp, q) is None:
                row, layouts = _span_record(sp, keep)
                groups.setdefault(layouts, []).append(row)
            else:
                fallback.append(sp)
    rotated = [(layouts, rows) for layouts, rows in groups.items() if layouts[0].ROT or layouts[1].ROT]
    plain = [(layouts, rows) for layouts, rows in groups.items() if not (layouts[0].ROT or layouts[1].ROT)]
    parts = [(layouts, rows, dense if i == 0 else []) for i, (layouts, rows) in enumerate(plain)]
    if not parts and dense:
        parts = [(None, [], dense)]
    if len(parts) == 1 and not rotated and not fallback:
        layouts, rows, dense_rows = parts[0]
        return _launch(q, scale, h_kv, rows, dense_rows, layouts, q.dtype, False)[0]
    state = None
    for part in _partials(q, scale, h_kv, parts, rotated, fallback):
        state = kernels.merge_partials(state, part, backend="triton")
    return state[0].to(q.dtype)


def _partials(q, scale, h_kv, parts, rotated, fallback):
    """The partial results (out fp32, lse) of :func:`attention_triton`'s launches, one at a time."""
    for layouts, rows, dense_rows in parts:
        yield _launch(q, scale, h_kv, rows, dense_rows, layouts, torch.float32, True)
    for layouts, rows in rotated:
        yield _rotated_launch(q, scale, h_kv, rows, layouts)
    for sp in fallback:  # decompressed one at a time: never the whole history at once
        keep = []
        row = _dense_record(DenseKV(*sp.materialize()), keep)
        yield _launch(q, scale, h_kv, [], [row], None, torch.float32, True)
