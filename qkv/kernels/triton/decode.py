"""Attention for few queries over compressed spans (flash-decoding), twin of
:func:`qkv.kernels.attention.attention_decode_torch`.

Token-by-token decoding reads the whole history for one query per head: the work is the bytes of
the cache, so the compressed spans should be read once, by many programs at a time. The keys are
cut into pieces (work items of the span table, built once per set of spans: records.py) and every
program attends to a run of pieces for all the query heads that share one KV head (GQA: a key
tile is decoded once for all of them), writing a partial output and log-sum-exp; one merge
launch combines them exactly. Every layout the prefill kernel reads is read here: per-token and
per-channel codes, 1-8 bits, both packings, up to four additive stages, float-cast spans,
full-precision tokens, and Hadamard-rotated spans (the queries are rotated once, by one launch,
rounded to their dtype as the keys' decoded values are; at one query or few the partials stay in
the rotated basis, full-precision ones rotated into it, and the merge rotates each output row
back once; with more queries each program rotates its partial back). The
full-precision segments (sink, tail, current chunk) are split into pieces the same way, by
address: the per-call path copies nothing to the device.
"""

from __future__ import annotations

import dataclasses

import torch
from triton.runtime.errors import OutOfResources

from qkv.errors import ConfigError
from qkv.kernels.attention import default_scale
from qkv.kernels.segments import CompressedSpan, DenseKV, SpanPlan
from qkv.kernels.triton.attention import LOG2E, attention_supports, span_record_of
from qkv.kernels.triton import decode_kernel as jit
from qkv.kernels.triton.hadamard import hadamard_triton
from qkv.kernels.triton.launch import Launcher
from qkv.kernels.triton.records import NO_SPANS, TENSOR_FIELDS, TL_DTYPES, offsets, span_table
from qkv.kernels.triton.tiles import DecodeTile, multiprocessors, tile_for

# launched once per layer and generated token: without Triton's per-launch binding (launch.py)
decode_kernel = Launcher(jit.decode_kernel)
merge_kernel = Launcher(jit.merge_kernel)
centroid_scores_kernel = Launcher(jit.centroid_scores_kernel)

# The partial outputs of all programs take at most this share of the bytes they read (the
# compressed spans and the full-precision keys), so decoding needs almost no memory beyond the
# cache; within that, enough programs for the tile's waves on the GPU.
PARTIAL_SHARE = 0.05
# Rotated values of at most this many query rows a KV head are rotated back by the merge, a row
# once, rather than by every program (docs/attention.md: one query of Llama-3-8B heads, 4 rows,
# gained; sixteen, 64 rows, lost)
MERGE_ROTATION_ROWS = 16
# the smallest key tile the decode kernel takes on a GPU: on an H100, 16-key tiles gave wrong outputs
# for every layout of per-token codes (qvg, rtn, quarot, int4; 1, 2 and 4 warps; errors 1.4-3.2
# where 32-key tiles are within 0.011), kivi's and float-cast spans' were right; cause not found
# (benchmarks/decode_small_tiles.py lifts the limit to check again)
GPU_MIN_BLOCK_N = 32
# partials per load of the merge: 16, or 64 beyond 16 partials (two compiled variants, not one per
# power of two the partial count passes as the history grows)
MERGE_PARTS = (16, 64)


def merge_rotates(values_rotated: bool, rows: int) -> bool:
    """Whether the merge rotates the output rows back (the partials in the rotated basis): some
    values are stored rotated and there are at most MERGE_ROTATION_ROWS query rows a KV head."""
    return values_rotated and rows <= MERGE_ROTATION_ROWS


_C_STRIDE = offsets(TENSOR_FIELDS)["c_stride0"]  # a key record's stage strides (clusters x D) start here


def key_scores(tile: DecodeTile, layout, q_dtype: torch.dtype, rows: int, keys: int) -> bool:
    """Whether keys of ``layout`` are scored through their centroids' table (``KEY_SCORES``: q . c
    once per centroid and call, gathered per key, instead of a centroid row added to every decoded
    key): the keys add bf16 centroids back, the queries are bf16, one program holds every query
    row of a KV head, and the call reads at least the tile's ``key_scores`` keys (the spans' live
    keys times the batch: the table's launch is a fixed cost)."""
    return (tile.key_scores is not None and keys >= tile.key_scores and layout.STAGES > 0 and not layout.ROT
            and layout.CENT_T == TL_DTYPES[torch.bfloat16] and q_dtype == torch.bfloat16 and rows <= tile.max_rows)


def _cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` of host integers without its constexpr wrapper: the launch is sized on every
    call, per layer and generated token, and the wrapper's argument unwrapping costs far more than
    the division."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """``triton.next_power_of_2`` of a positive host integer, as :func:`_cdiv`."""
    return 1 << (n - 1).bit_length()


def plan_table(plan: SpanPlan, device: torch.device, piece: int):
    """The plan's span table on ``device`` for work items of ``piece`` keys (built on first use,
    then reused by the decode and decompress kernels; where the plan extends an earlier one, that
    one's table extended by the spans added since); None when a span cannot be read directly (see
    :func:`plan_support`)."""
    key = ("span table", device, piece)

    def build():
        base = plan.extends(key)
        if base is not None and base[0] is None:
            return None
        spans = plan.spans if base is None else base[1]
        records = [(plan.record(sp, span_record_of), sp.skip) for sp in spans]
        if any(rec.unsupported for rec, _ in records):
            return None
        return span_table(records, device, piece, None if base is None else base[0])

    return plan.table(key, build)


def plan_support(plan: SpanPlan, q: torch.Tensor) -> str | None:
    """Why the decode kernel cannot read every span of ``plan`` for queries ``q`` (None if it can;
    worked out once per plan and query dtype, for the spans added since the plan it extends)."""
    key = ("decode support", q.dtype)

    def check():
        base = plan.extends(key)
        if base is not None and base[0] is not None:
            return base[0]
        for sp in plan.spans if base is None else base[1]:
            rec = plan.record(sp, span_record_of)
            if rec.unsupported:
                return rec.unsupported
            if rec.dtype != q.dtype:
                return f"a span was compressed from {rec.dtype}, the queries are {q.dtype}"
        return None

    return plan.table(key, check)


def _split(segments) -> tuple[list[SpanPlan], list[DenseKV]]:
    plans, loose, dense = [], [], []
    for seg in segments:
        if isinstance(seg, SpanPlan):
            plans.append(seg)
        elif isinstance(seg, CompressedSpan):
            loose.append(seg)
        elif seg.tokens:
            dense.append(seg)
    if loose:
        plans.append(SpanPlan(loose))
    return plans, dense


def decode_supports(q, segments, scale=None, live=None) -> str | None:
    """Why the decode kernel cannot run this call (None if it can)."""
    if live is not None and not segments[-1].tokens:
        return "the segment whose live keys the device counts has no room"
    reason = attention_supports(q, [s for s in segments if isinstance(s, DenseKV)])
    if reason is not None:
        return reason
    plans, _ = _split(segments)
    if len(plans) > 1:
        return "the spans are in more than one plan"
    return plan_support(plans[0], q) if plans else None


def _dense_args(dense: list[DenseKV], q: torch.Tensor, live: torch.Tensor | None) -> tuple[list, int]:
    """Kernel arguments of two full-precision segments (more are joined into two; an absent one
    is ``q`` with no tokens; with ``live``, the last one is the second, its room counted as its
    tokens), then ``live`` (or ``q``), and their tokens."""
    if len(dense) > 2:
        first = DenseKV(torch.cat([s.k for s in dense[:-1]], 2), torch.cat([s.v for s in dense[:-1]], 2))
        dense = [first, dense[-1]]
    args, tokens = [], 0
    if live is not None and len(dense) == 1:
        args += _no_dense(q)
    for seg in dense:
        k, v = seg.k, seg.v
        k = k if k.stride(3) == 1 else k.contiguous()
        v = v if v.stride(3) == 1 else v.contiguous()
        ks, vs = k.stride(), v.stride()
        n = k.shape[2]
        args += (k, v, n, ks[0], ks[1], ks[2], vs[0], vs[1], vs[2])
        tokens += n
    for _ in range(2 - len(args) // 9):
        args += _no_dense(q)
    return [*args, q if live is None else live], tokens


def _no_dense(q: torch.Tensor) -> tuple:
    """The kernel arguments of an absent full-precision segment."""
    qs = q.stride()
    return q, q, 0, qs[0], qs[1], qs[2], qs[0], qs[1], qs[2]


def _launch_decode(grid, pipelines, *args, **kwargs) -> None:
    """``decode_kernel`` at the first pipelining depth whose shared memory fits the GPU."""
    for i, stages in enumerate(pipelines):
        try:
            decode_kernel[grid](*args, **kwargs, num_stages=stages)
            return
        except OutOfResources:  # raised before the launch: nothing ran
            if i == len(pipelines) - 1:
                raise


@dataclasses.dataclass(frozen=True)
class _Static:
    """What every decode call at one query shape over one plan (or over full-precision keys
    alone) shares, worked out on the first such call: the tile, the span table, the row blocks,
    the sizes that split the work, and each launch's constexprs (without and with the
    full-precision keys)."""

    tile: DecodeTile
    table: object
    block_m: int
    row_blocks: int
    rows_total: int
    programs: int  # (batch, KV head, row block) triples: the grid's last two axes
    wave: int
    span_bytes: int
    token_bytes: int  # of a full-precision key and value over every (batch, KV head)
    partial_bytes: int  # of one program's partials over every row
    # per span group (or one without spans): (group, constexprs, constexprs with dense keys, with
    # dense keys of which the device holds the last segment's count, where its centroid scores
    # start in the call's table and the scores kernel's constexprs, or None)
    launches: tuple
    merge: dict
    c_max: int  # clusters of the largest key stage (the scores table's last axis)
    score_values: int  # of the call's centroid scores table


def _static(plan: SpanPlan | None, q: torch.Tensor, h_kv: int, tile: DecodeTile | None) -> _Static:
    """:class:`_Static` of a call of ``q`` over ``plan``: kept by the plan (every call over the
    same spans reuses it), built anew without one."""
    key = ("decode launch", q.shape, q.dtype, q.device, h_kv, tile)

    def build() -> _Static:
        b, h, sq, d = q.shape
        device = q.device
        emulate = device.type != "cuda"
        rows = h // h_kv * sq  # query rows per KV head
        reads = b * plan.tokens if plan is not None else 0  # span keys over the batch
        chosen = tile or tile_for("decode", device, rows, plan.keys if plan is not None else "codes", reads)
        if not emulate and chosen.block_n < GPU_MIN_BLOCK_N:
            raise ConfigError(f"decode tile: block_n={chosen.block_n} on a GPU, at least {GPU_MIN_BLOCK_N} "
                              f"(smaller key tiles decode wrong values there)")
        table = plan_table(plan, device, chosen.piece) if plan is not None else None
        block_m = min(max(16, _pow2(rows)), chosen.max_rows)
        row_blocks = _cdiv(rows, block_m)
        common = dict(D=d, BLOCK_M=block_m, BLOCK_N=chosen.block_n, KV_T=TL_DTYPES[q.dtype],
                      DOT_BF16=q.dtype == torch.bfloat16, EMULATE=emulate, H_NORM=d**-0.5,
                      num_warps=chosen.warps, maxnreg=chosen.maxnreg)
        # few rows a KV head (one query): many programs a row, so partials stay in the rotated basis
        # where some values are stored rotated and the merge rotates each row back once; more rows:
        # few programs a row, each rotating its partial back on tensor cores (cheaper there)
        out_rot = table is not None and merge_rotates(any(g.layouts[1].ROT for g in table.groups), rows)
        c_max = max((rec.fields[_C_STRIDE + i] // d for rec in table.records for i in range(rec.layouts[0].STAGES)),
                    default=0) if table is not None else 0
        launches, score_values = [], 0
        for g in (table.groups if table is not None else ()) or (None,):
            k_layout, v_layout = g.layouts if g is not None else NO_SPANS
            scored = g is not None and key_scores(chosen, k_layout, q.dtype, rows, reads)
            kw = dict(common, HAS_SPANS=g is not None, OUT_ROT=out_rot, K=k_layout, V=v_layout, KEY_SCORES=scored)
            scores = None
            if scored:
                scores = (score_values, dict(D=d, BLOCK_M=block_m, BLOCK_C=64, STAGES=k_layout.STAGES,
                                             CENT_T=k_layout.CENT_T, EMULATE=emulate, num_warps=4))
                score_values += g.table.shape[0] * k_layout.STAGES * b * h_kv * rows * c_max
            launches.append((g, dict(kw, HAS_DENSE=False, LIVE=False), dict(kw, HAS_DENSE=True, LIVE=False),
                             dict(kw, HAS_DENSE=True, LIVE=True), scores))
        rows_total = b * h * sq
        return _Static(
            tile=chosen, table=table, block_m=block_m, row_blocks=row_blocks, rows_total=rows_total,
            programs=b * h_kv * row_blocks,
            wave=chosen.waves * (4 if emulate else multiprocessors(device.index or 0)),
            span_bytes=table.nbytes if table is not None else 0, token_bytes=2 * b * h_kv * d * q.itemsize,
            partial_bytes=rows_total * (d + 1) * 4, launches=tuple(launches),
            merge=dict(D=d, EMULATE_BF16=emulate and q.dtype == torch.bfloat16, ROT=out_rot, H_NORM=d**-0.5,
                       num_warps=4),
            c_max=c_max, score_values=score_values,
        )

    return plan.table(key, build) if plan is not None else build()


def decode_triton(q: torch.Tensor, segments, scale: float | None = None, live: torch.Tensor | None = None, *,
                  tile: DecodeTile | None = None) -> torch.Tensor:
    """Triton twin of :func:`qkv.kernels.attention.attention_decode_torch`: [B, H, Sq, D] in q's
    dtype. ``segments``: DenseKV, CompressedSpan and at most one SpanPlan (whose span table and
    launch constants are worked out once and reused by every call), as
    :func:`qkv.kernels.attention` checks them. ``live``: the last segment's keys are its first
    ``live`` (read by the kernel from the device, at most its length: the rest is room a replayed
    call's tail grows into); the launch is sized for the whole segment. ``tile``: the launch
    (default: the device's, see :mod:`qkv.kernels.triton.tiles`)."""
    scale = default_scale(q, scale)
    plans, dense = _split(segments)
    b, h, sq, d = q.shape
    h_kv = (dense[0].k if dense else plans[0].spans[0].ckv.k).shape[1]
    st = _static(plans[0] if plans else None, q, h_kv, tile)
    piece, table = st.tile.piece, st.table
    q = q if q.stride(-1) == 1 else q.contiguous()
    dense_args, dense_tokens = _dense_args(dense, q, live)
    span_tokens = table.n_items * piece if table is not None else 0
    # programs per (batch, KV head, row block): a few waves, partials within their byte budget
    budget = max(1, int(PARTIAL_SHARE * (st.span_bytes + dense_tokens * st.token_bytes)) // st.partial_bytes)
    parts = max(1, min(budget, _cdiv(st.wave, st.programs)))
    per_prog = max(1, _cdiv(_cdiv(span_tokens + dense_tokens, parts), piece))
    dense_piece = per_prog * piece
    dense_progs = _cdiv(dense_tokens, dense_piece)
    span_progs = [_cdiv(g.n_items, per_prog) if g is not None else 0 for g, *_ in st.launches]
    n_parts = sum(span_progs) + dense_progs
    rows_total = st.rows_total
    q_rot = q
    if table is not None and table.rotated:  # H q . H k = q . k; one set of strides for q and H q
        q = q.contiguous()
        q_rot = hadamard_triton(q)
    partials = torch.empty(n_parts * rows_total * (d + 1), dtype=torch.float32, device=q.device)  # outputs, then lse
    scores = torch.empty(st.score_values, dtype=torch.float32, device=q.device) if st.score_values else partials
    base = 0
    for (g, plain, with_dense, with_live, sc), n_span in zip(st.launches, span_progs):
        n_dense = dense_progs if base == 0 else 0
        if n_span + n_dense == 0:
            continue
        cs = partials
        if sc is not None and n_span:
            cs = scores[sc[0]:]
            centroid_scores_kernel[(g.table.shape[0], b * h_kv)](q, cs, g.table, h, h_kv, sq, st.c_max,
                                                                  *q.stride()[:3], **sc[1])
        _launch_decode(
            (n_span + n_dense, b * h_kv, st.row_blocks), st.tile.stages,
            q, q_rot if g is not None and g.layouts[0].ROT else q, partials, n_parts,
            g.table if g is not None else partials, g.items if g is not None else partials, cs, st.c_max,
            g.n_items if g is not None else 0, per_prog, n_span, base, dense_piece,
            *dense_args, h, h_kv, sq, rows_total, *q.stride()[:3], scale * LOG2E,
            **((with_live if live is not None else with_dense) if n_dense else plain),
        )
        base += n_span + n_dense
    out = torch.empty(b, h, sq, d, dtype=q.dtype, device=q.device)
    merge_kernel[(rows_total,)](
        partials, out, n_parts, rows_total, h, sq, *out.stride()[:3],
        BLOCK_P=MERGE_PARTS[n_parts > MERGE_PARTS[0]], **st.merge,
    )
    return out
