"""The kernels' view of stored spans, built once when a span is stored and reused by every call.

A compressed tensor is read by the attention kernels through a *record*: a row of int64 fields
(addresses, sizes, strides) named by :data:`TENSOR_FIELDS`; a span's row is :data:`SPAN_FIELDS`
(its size, its evicted tokens, then the key and value records). The @triton.jit code reads fields
by the same names (the ``F_*`` constants of ``tile.py`` and ``S_*`` of ``attention_kernel.py`` are
built from these tables), so no offset is written twice. A record says nothing the kernels must
compile: that is the :class:`TensorLayout`, which every kernel that decodes codes (dequantize,
attention, decode) takes whole as one constexpr and reads by field name.

:func:`span_record` builds a span's record from its tensors' formats
(:class:`qkv.format.TensorFormat`) and tensors alone; :class:`SpanTable` holds the records of a
whole history on the device with the decode kernel's work items (pieces of ``piece`` keys), so a
call over the same spans does no host-to-device copy and no per-span Python work.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton.language as tl
from einops import rearrange

from qkv.format import AffineFormat, Undo
from qkv.kernels.triton.bits import LAUNCH_STAGES

TENSOR_FIELDS = (
    "codes", "scales", "zeros", "mult", "fp", "quantized", "words", "groups", "fp_len",
    *(f"c{i}" for i in range(LAUNCH_STAGES)), *(f"c_stride{i}" for i in range(LAUNCH_STAGES)),
    *(f"a{i}" for i in range(LAUNCH_STAGES)), *(f"a_stride{i}" for i in range(LAUNCH_STAGES)),
)
SPAN_FIELDS = ("tokens", "skip", *(f"k.{f}" for f in TENSOR_FIELDS), *(f"v.{f}" for f in TENSOR_FIELDS))
DENSE_FIELDS = ("k", "v", "tokens", "k_stride_b", "k_stride_h", "k_stride_s", "v_stride_b", "v_stride_h", "v_stride_s")
# a work item: keys lo .. hi of one span (a row of the span table); "at": where key lo goes among
# the live keys of all the table's spans, in the order they were given (decompression writes there)
ITEM_FIELDS = ("span", "lo", "hi", "at")


def offsets(fields: tuple[str, ...]) -> dict[str, int]:
    """Field name -> its position in a record."""
    return {name: i for i, name in enumerate(fields)}


TL_DTYPES = {
    torch.uint8: tl.uint8, torch.int8: tl.int8, torch.int16: tl.int16, torch.int32: tl.int32,
    torch.int64: tl.int64, torch.float32: tl.float32, torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16, torch.float8_e4m3fn: tl.float8e4nv,
}
# the smallest token tile a kernel decodes (a per-channel tile must hold whole words)
MIN_TOKEN_TILE = 16


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """The compile-time description of one compressed tensor. Kernels take it whole as a constexpr
    (``K`` / ``V`` in the attention kernels, ``LAYOUT`` in dequantize) and read fields by name
    (``L.BITS``); dtypes are Triton's. ``A_T``: each stage's assignment dtype."""

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
    ROT: bool = False
    CODE_T: tl.dtype = tl.bfloat16
    SCALE_T: tl.dtype = tl.float32
    CENT_T: tl.dtype = tl.bfloat16
    A_T: tuple[tl.dtype, ...] = ()
    VEC: bool = False
    WORDS_MULT: int = 1
    HAS_FP: bool = False

    @property
    def STAGES(self) -> int:
        return len(self.A_T)

    def __hash__(self) -> int:  # of its fields, as the dataclass's, computed once: hashed at every
        return self._hash  # launch (Triton's kernel key) and for every span of a span table

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    def joined(self, other: "TensorLayout") -> "TensorLayout":
        """One layout that reads spans of both (same codes): vector loads only if both allow
        them, the full-precision tail check if either needs it (``self`` when that changes
        nothing: a span table joins the layouts of every span)."""
        vec, has_fp = self.VEC and other.VEC, self.HAS_FP or other.HAS_FP
        return self if (vec, has_fp) == (self.VEC, self.HAS_FP) else dataclasses.replace(self, VEC=vec, HAS_FP=has_fp)

    @functools.cached_property
    def code_key(self) -> "TensorLayout":
        """The layout without the per-span flags (spans with equal keys share a launch); made once
        per layout (a span table asks it of every span each time the spans change)."""
        return dataclasses.replace(self, VEC=False, HAS_FP=False)


# the K and V layouts of a launch that reads no span (its spans' constexprs unused): one instance,
# so that its hash, which Triton's kernel key takes at every launch, is computed once
NO_SPANS = (TensorLayout(), TensorLayout())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def code_layout(quant: AffineFormat, d: int, mult, centroids, assignments, **fields) -> TensorLayout:
    """The layout of codes in format ``quant`` for head dim ``d``, stored with row multipliers
    ``mult`` (None: none, e.g. no quantized token) and stages of these ``centroids`` /
    ``assignments`` (their dtypes); ``fields``: the rest (record flags). The dequantize and
    attention kernels decide their tile decoding from it alike. FAST: whole codes per word, powers
    of two for D, the codes per word and the block, and whole words per block, with per-token
    blocks that tile the row, or per-channel rows read a word at a time (every token tile, at
    least :data:`MIN_TOKEN_TILE`, then holds whole words and whole blocks or part of one): see
    ``tile.decode_tile``."""
    per = quant.pack.word_bits // quant.bits
    fast = (quant.pack.word_bits % quant.bits == 0 and is_pow2(d) and is_pow2(per) and is_pow2(quant.block)
            and quant.block % per == 0 and (quant.axis == "token" and d % quant.block == 0
                                            or quant.axis == "channel" and per <= MIN_TOKEN_TILE))
    return TensorLayout(
        CAST=False, BITS=quant.bits, QBLOCK=quant.block, OFFSET=quant.offset, HAS_ZERO=quant.has_zero,
        HAS_MULT=mult is not None, TOKEN_AXIS=quant.axis == "token", FAST=fast, WORD=quant.pack.word_bits,
        MSB=quant.pack.msb_first, CODE_T=TL_DTYPES[quant.pack.container], SCALE_T=TL_DTYPES[quant.scale_dtype],
        CENT_T=TL_DTYPES[centroids[0].dtype] if centroids else tl.bfloat16,
        A_T=tuple(TL_DTYPES[a.dtype] for a in assignments), **fields,
    )


def tensor_support(name: str, ct) -> str | None:
    """Why the kernels cannot decode this compressed tensor (None if they can)."""
    fmt = ct.format
    if fmt.undo is Undo.ADD and len(fmt.stages) > LAUNCH_STAGES:
        return f"{name}: {len(fmt.stages)} smoothing stages (the kernels add at most {LAUNCH_STAGES})"
    if fmt.undo is Undo.ROTATE and len(fmt.stages) != 1:
        return f"{name}: {len(fmt.stages)} Hadamard stages (the kernels undo one)"
    return None


def _aligned(*byte_values: int) -> bool:
    """Whether every address / byte stride is a multiple of 16 (0: absent or a broadcast)."""
    return all(v % 16 == 0 for v in byte_values)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return rearrange(t, "b h ... -> (b h) ...")


def tensor_record(ct) -> tuple[list[int], TensorLayout, list[torch.Tensor]]:
    """(fields in TENSOR_FIELDS order, layout, the tensors whose addresses the fields hold) of one
    compressed tensor (a :class:`qkv.compressed.CompressedTensor`: its format and tensors)."""
    keep: list[torch.Tensor] = []

    def addr(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.contiguous()
        keep.append(t)
        return t.data_ptr()

    fmt = ct.format
    b, h, s, d = ct.shape
    s_q = ct.quantized_tokens
    fp = addr(ct.fp_tokens)
    if fmt.codes is None:
        fields = [addr(ct.codes), 0, 0, 0, fp, s_q, d, 0, s - s_q] + [0] * (4 * LAUNCH_STAGES)
        size = fmt.cast_dtype.itemsize
        layout = TensorLayout(CAST=True, CODE_T=TL_DTYPES[fmt.cast_dtype], VEC=_aligned(fields[0], fp, d * size),
                              WORDS_MULT=16 // size, HAS_FP=s_q < s)
        return fields, layout, keep
    cents, assigns = [], []
    if fmt.undo is Undo.ADD and s_q:
        for i, data in enumerate(ct.stages):
            cents.append(_flat(data.centroids).contiguous())
            a = ct.stage_assignments(i)
            assigns.append(a if a.stride(1) == 1 else a.contiguous())
    keep.extend(cents + assigns)
    pad = [0] * (LAUNCH_STAGES - len(cents))
    words = ct.codes.shape[-1] if s_q else 0
    fields = [
        addr(ct.codes), addr(ct.scales), addr(ct.zeros), addr(ct.scale_mult), fp, s_q,
        words, ct.scales.shape[-1] if s_q else 0, s - s_q,
        *(c.data_ptr() for c in cents), *pad, *(c.shape[1] * d for c in cents), *pad,
        *(a.data_ptr() for a in assigns), *pad, *(a.stride(0) for a in assigns), *pad,
    ]
    container = fmt.codes.pack.container
    vec = _aligned(fields[0], fp, words * container.itemsize,
                   *(c.data_ptr() for c in cents), *(c.stride(0) * c.itemsize for c in cents),
                   *(a.data_ptr() for a in assigns), *(a.stride(0) * a.itemsize for a in assigns))
    layout = code_layout(fmt.codes, d, ct.scale_mult, cents, assigns, VEC=vec, WORDS_MULT=16 // container.itemsize,
                         HAS_FP=s_q < s, ROT=fmt.undo is Undo.ROTATE)
    return fields, layout, keep


@dataclasses.dataclass(frozen=True, eq=False)
class SpanRecord:
    """What the kernels need to read one stored span (built once, when it is stored): its key
    and value fields, their layouts, the tensors those fields point into, its size, dtype and
    stored bytes; ``unsupported``: why the kernels cannot read it (then only that is set)."""

    fields: tuple[int, ...] = ()
    layouts: tuple[TensorLayout, TensorLayout] | None = None
    keep: tuple[torch.Tensor, ...] = ()
    tokens: int = 0
    dtype: torch.dtype | None = None
    nbytes: int = 0
    unsupported: str | None = None


def span_record(ckv) -> SpanRecord:
    """The :class:`SpanRecord` of a compressed span ``ckv`` (from its data and formats alone)."""
    for name, ct in (("k", ckv.k), ("v", ckv.v)):
        reason = tensor_support(name, ct)
        if reason is not None:
            return SpanRecord(unsupported=reason)
    k_fields, k_layout, k_keep = tensor_record(ckv.k)
    v_fields, v_layout, v_keep = tensor_record(ckv.v)
    return SpanRecord(tuple(k_fields + v_fields), (k_layout, v_layout), tuple(k_keep + v_keep),
                      ckv.k.shape[2], ckv.k.dtype, ckv.nbytes)


@dataclasses.dataclass(frozen=True, eq=False)
class SpanGroup:
    """Spans of one layout on the device: ``table`` [n, len(SPAN_FIELDS)] int64 and the kernels'
    work items ``items`` [n_items, len(ITEM_FIELDS)] int64 (pieces of at most ``piece`` keys,
    each inside one span, aligned to ``piece`` but for a span's first retained key)."""

    layouts: tuple[TensorLayout, TensorLayout]
    table: torch.Tensor
    items: torch.Tensor
    n_items: int
    nbytes: int


@dataclasses.dataclass(frozen=True, eq=False)
class SpanTable:
    """The records of a history's spans on the device, grouped by layout (usually one group),
    built once per set of spans and reused by every call; ``records`` keeps the tensors alive;
    ``keys``: the spans' live keys; ``n_items``: the groups' work items; ``rotated``: whether a
    group's keys are Hadamard-rotated."""

    groups: tuple[SpanGroup, ...]
    records: tuple[SpanRecord, ...]
    dtype: torch.dtype | None
    nbytes: int
    keys: int
    n_items: int
    rotated: bool


def device_rows(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """``rows`` as an int64 tensor on ``device``. To a GPU through pinned memory, without a host
    sync (a copy from pageable memory waits for the queue to drain; torch keeps the pinned buffer
    until the copy is done); not while a CUDA graph is being captured, where a replay would read
    the freed buffer again (the plain copy refuses to be captured instead)."""
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def span_table(spans: list[tuple[SpanRecord, int]], device: torch.device, piece: int,
               previous: SpanTable | None = None) -> SpanTable:
    """A :class:`SpanTable` of readable spans ``(record, skip)`` (one host-to-device copy per
    group); ``piece``: keys per work item. ``previous``: the table of the spans before these
    (made with the same ``piece`` on ``device``), which the result extends: only the new spans'
    rows and items are built, each group's new rows copied and appended on the device, so a
    history that gains a span a step (KIVI's residual groups) does not walk all of its spans."""
    # per code key: [joined layouts, new table rows, new items, the group before (or None), new bytes]
    groups: dict = {}
    for g in previous.groups if previous is not None else ():
        groups[tuple(lay.code_key for lay in g.layouts)] = [g.layouts, [], [], g, 0]
    at = previous.keys if previous is not None else 0  # the first live key of each span among all
    for rec, skip in spans:
        group = groups.setdefault(tuple(lay.code_key for lay in rec.layouts), [rec.layouts, [], [], None, 0])
        group[0] = (group[0][0].joined(rec.layouts[0]), group[0][1].joined(rec.layouts[1]))
        i = len(group[1]) + (group[3].table.shape[0] if group[3] is not None else 0)
        group[1].append([rec.tokens, skip, *rec.fields])
        lo = skip
        while lo < rec.tokens:
            hi = min((lo // piece + 1) * piece, rec.tokens)
            group[2].append([i, lo, hi, at + lo - skip])
            lo = hi
        at += rec.tokens - skip
        group[4] += rec.nbytes
    out = []
    for layouts, rows, items, before, size in groups.values():
        if not rows:  # a group of the earlier spans that gained none
            out.append(before)
            continue
        table, item_t = device_rows(rows, device), device_rows(items or [[0] * len(ITEM_FIELDS)], device)
        n_items = len(items)
        if before is not None:
            table = torch.cat([before.table, table])
            if before.n_items:
                item_t = torch.cat([before.items, item_t]) if items else before.items
            n_items, size = before.n_items + n_items, before.nbytes + size
        out.append(SpanGroup(layouts, table, item_t, n_items, size))
    records = (previous.records if previous is not None else ()) + tuple(rec for rec, _ in spans)
    dtype = records[0].dtype if records else None
    return SpanTable(tuple(out), records, dtype, sum(g.nbytes for g in out), at, sum(g.n_items for g in out),
                     any(g.layouts[0].ROT for g in out))
