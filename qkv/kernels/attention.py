"""Attention over a KV history of full-precision and compressed segments: the plain-PyTorch reference.

A history is a sequence of segments: :class:`DenseKV` (keys and values in full precision) and
:class:`CompressedSpan` (a :class:`~qkv.compressed.CompressedKV`, which describes itself, and how
many of its leading tokens were evicted). The attention is not causal: every query sees
every key of every segment (the Wan / Self-Forcing pattern, where a chunk's queries attend to
[history, chunk]), so the order of the segments does not matter.

:func:`attention_torch` decompresses one segment at a time with :func:`qkv.kernels.decompress`, attends to it
in fp32 and merges the partial results by their log-sum-exp, so the whole history is never
materialized at once. The Triton twin (:mod:`qkv.kernels.triton.attention`) reads the compressed
spans directly instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from einops import rearrange, repeat

from qkv import kernels
from qkv.compressed import CompressedKV
from qkv.errors import DeviceError, DTypeError, ShapeError

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class DenseKV:
    """Full-precision keys and values, each [B, H_kv, S, D]."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    def materialize(self, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        return self.k, self.v


@dataclasses.dataclass(frozen=True)
class CompressedSpan:
    """A compressed span [B, H_kv, S, D], of which the first ``skip`` tokens are evicted."""

    ckv: CompressedKV
    skip: int = 0

    @property
    def tokens(self) -> int:
        return self.ckv.k.shape[2] - self.skip

    def materialize(self, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The decompressed (k, v) [B, H_kv, tokens, D] in the dtype they were compressed from."""
        k, v = (kernels.decompress(ct, backend=backend) for ct in (self.ckv.k, self.ckv.v))
        return k[:, :, self.skip :], v[:, :, self.skip :]


# The most keys per head that the staged path decompresses at once (a longer span alone): groups
# of short spans (a chunk per span) then cost as few attention calls and merges as long ones
STAGE_TOKENS = 32768
# Partial results held before they are folded into the running state in one pass (the state is
# read and written once per fold, not once per part; the parts held take at most twice the fp32
# state's bytes when they are bf16)
MERGE_PARTS = 4


KEY_CLASSES = ("centroids", "codes", "cast")


def key_class(classes: Sequence[str], spans: Sequence[CompressedSpan]) -> str:
    """The class of keys of ``spans`` together with spans of ``classes``: "centroids" where any
    span's keys add centroids back (qvg and the other smoothed presets), "cast" where every span's
    keys and values are stored as floats (bf16 spans), "codes" otherwise."""
    def own(sp: CompressedSpan) -> str:
        if any(st.centroids is not None for st in sp.ckv.k.stages):
            return "centroids"
        return "cast" if sp.ckv.k.format.codes is None and sp.ckv.v.format.codes is None else "codes"

    classes = [*classes, *map(own, spans)]
    if "centroids" in classes:
        return "centroids"
    return "cast" if classes and set(classes) == {"cast"} else "codes"


def span_groups(spans: Sequence[CompressedSpan], limit: int, previous: SpanPlan | None = None) -> list[SpanPlan]:
    """``spans`` in order, cut into consecutive groups of at most ``limit`` tokens each (a span
    longer than that is a group of its own), each a :class:`SpanPlan`: the staged path decompresses
    a group into one buffer (:meth:`SpanPlan.materialize`). With ``previous``, the plan they come
    from, the groups build their records into its store (so a later plan over these spans takes
    them over), and a group of exactly the spans of one of the groups ``previous`` took over is
    that group, tables and all."""
    groups: list[list[CompressedSpan]] = []
    total = 0
    for sp in spans:
        if not groups or total + sp.tokens > limit:
            groups.append([])
            total = 0
        groups[-1].append(sp)
        total += sp.tokens
    if previous is None:
        return [SpanPlan(g) for g in groups]
    inherited = previous._inherited.get(limit, {})
    return [inherited.get(tuple(map(id, g))) or SpanPlan(g, records=previous._records) for g in groups]


class SpanPlan:
    """Compressed spans prepared once for the kernels, reused by every call over them (plan once,
    run many): a segment that stands for ``spans`` ([B, H_kv, S_i, D] each, one B, H_kv, D,
    dtype and device for all, checked here once). The kernels keep what they need to read the spans
    (each span's record, the device tables) in the plan, built on first use; a plan made with
    ``previous`` takes over the records of the spans they share, so adding a span builds one, and
    where its spans are those of ``previous`` and then more (a cache that compressed a span), it
    checks only the new ones and its tables may extend those of ``previous`` (:meth:`extends`).
    A plan must not outlive a change of its spans (a cache makes a new one when its spans change)."""

    def __init__(
        self, spans: Sequence[CompressedSpan], previous: SpanPlan | None = None, *, records: dict | None = None
    ) -> None:
        self.spans = tuple(spans)
        # the kernels' records by id(span.ckv): ``records`` shares a parent plan's store (a staged
        # group builds into its parent's); ``previous`` hands over those of the spans kept
        self._records: dict[int, object] = {} if records is None else records
        # previous's staged groups whose spans are all kept, by limit and span ids (span_groups)
        self._inherited: dict[int, dict[tuple[int, ...], SpanPlan]] = {}
        # previous's spans and tables when this plan's spans begin with all of previous's
        self._base: tuple[int, dict] | None = None
        if previous is not None:
            kept = {id(sp.ckv) for sp in self.spans}
            self._records = {key: rec for key, rec in previous._records.items() if key in kept}
            alive = set(map(id, self.spans))
            for key, groups in previous._tables.items():
                if isinstance(key, tuple) and key[0] == "staged":
                    self._inherited[key[1]] = {
                        tuple(map(id, g.spans)): g for g in groups if alive.issuperset(map(id, g.spans))
                    }
            n = len(previous.spans)
            if 0 < n <= len(self.spans) and all(a is b for a, b in zip(previous.spans, self.spans)):
                self._base = (n, previous._tables)
        self._tables: dict = {}
        base = self._base is not None
        known = self._base[0] if base else 0  # spans checked by previous
        added = self.spans[known:]
        metas = ([previous.meta] if base else []) + [_kv_meta(sp) for sp in added]
        for i, (shape, dtype, device) in enumerate(metas[1:], max(known, 1)):
            if shape[0] != metas[0][0][0] or shape[1] != metas[0][0][1] or shape[3] != metas[0][0][3]:
                raise ShapeError(f"attention: span {i} has [B, H_kv, S, D] = {list(shape)}, span 0 {list(metas[0][0])}")
            if dtype != metas[0][1] or device != metas[0][2]:
                raise DTypeError(f"attention: span {i} is {dtype} on {device}, span 0 {metas[0][1]} on {metas[0][2]}")
        self.tokens = (previous.tokens if base else 0) + sum(sp.tokens for sp in added)
        # the class of the spans' keys, which the decode kernel's tiles are chosen by (tiles.py)
        self.keys = key_class([previous.keys] if base else [], added)
        self.meta = None
        if metas:
            b, h, _, d = metas[0][0]
            self.meta = ((b, h, self.tokens, d), metas[0][1], metas[0][2])

    def extends(self, key) -> tuple[object, tuple[CompressedSpan, ...]] | None:
        """What the plan this one was made from built under ``key`` and the spans added since,
        when this plan's spans are all of that plan's and then more (None otherwise, or if it
        built nothing under ``key``): a table builder extends it instead of walking every span."""
        if self._base is None or key not in self._base[1]:
            return None
        return self._base[1][key], self.spans[self._base[0] :]

    def record(self, span: CompressedSpan, build):
        """The kernels' record of ``span`` (one of :attr:`spans`): ``build(span)`` on first use."""
        key = id(span.ckv)
        if key not in self._records:
            self._records[key] = build(span)
        return self._records[key]

    def table(self, key, build):
        """What the kernels derive from these spans under ``key`` (a device table, a support
        check): ``build()`` on first use, then kept."""
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def staged(self, limit: int) -> list[SpanPlan]:
        """The staged path's groups of these spans (:func:`span_groups`), made once: the groups of
        the plan this one was made from are reused where they hold the same spans (a cache that
        adds a span a chunk rebuilds only its newest group)."""

        def build():
            groups = span_groups(self.spans, limit, self)
            self._inherited.pop(limit, None)  # what was not reused is no longer needed
            return groups

        return self.table(("staged", limit), build)

    def materialize(self, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """The live keys and values of every span, in order, in one buffer each
        ([B, H_kv, tokens, D], the spans' dtype): :func:`qkv.kernels.decompress_spans`."""
        (b, h, tokens, d), dtype, device = self.meta
        k, v = (torch.empty(b, h, tokens, d, dtype=dtype, device=device) for _ in range(2))
        kernels.decompress_spans(self, k, v, backend=backend)
        return k, v


def decompress_spans_torch(plan: SpanPlan, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """The live keys and values of every span of ``plan``, in order, written into ``k_out`` /
    ``v_out`` [B, H_kv, plan.tokens, D] (checked by :func:`qkv.kernels.decompress_spans`): span by
    span with :func:`qkv.kernels.decompress` (a partly evicted span decompressed whole, its live
    tokens copied)."""
    at = 0
    for sp in plan.spans:
        if sp.skip:
            for buf, part in zip((k_out, v_out), sp.materialize("torch")):
                buf[:, :, at : at + sp.tokens].copy_(part)
        else:
            for buf, ct in ((k_out, sp.ckv.k), (v_out, sp.ckv.v)):
                kernels.decompress(ct, out=buf[:, :, at : at + sp.tokens], backend="torch")
        at += sp.tokens


Segment = DenseKV | CompressedSpan | SpanPlan


def expand(segments: Sequence[Segment]) -> list[DenseKV | CompressedSpan]:
    """``segments`` with every :class:`SpanPlan` replaced by its spans."""
    out: list = []
    for seg in segments:
        out.extend(seg.spans if isinstance(seg, SpanPlan) else (seg,))
    return out


def _kv_meta(seg: Segment) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    if isinstance(seg, SpanPlan):
        return seg.meta
    if isinstance(seg, DenseKV):
        if seg.k.shape != seg.v.shape:
            raise ShapeError(f"attention: dense k {tuple(seg.k.shape)} and v {tuple(seg.v.shape)} differ")
        return tuple(seg.k.shape), seg.k.dtype, seg.k.device
    ct = seg.ckv.k
    if tuple(seg.ckv.v.shape) != tuple(ct.shape):
        raise ShapeError(f"attention: compressed k {ct.shape} and v {seg.ckv.v.shape} differ")
    if not 0 <= seg.skip < ct.shape[2]:
        raise ShapeError(f"attention: skip={seg.skip} outside a span of {ct.shape[2]} tokens")
    stored = next(iter(ct.tensors().values()))
    return tuple(ct.shape), ct.dtype, stored.device


def check_attention(q: torch.Tensor, segments: Sequence[Segment]) -> None:
    """Raise a typed error unless ``q`` [B, H, Sq, D] can attend to ``segments`` ([B, H_kv, S, D]
    each, one H_kv for all, H a multiple of it, same device, at least one key)."""
    if not torch.is_tensor(q) or q.dim() != 4:
        raise ShapeError(f"attention: q must be a [B, H, Sq, D] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in FLOATS:
        raise DTypeError(f"attention: q must be fp32/fp16/bf16, got {q.dtype}")
    if not segments or sum(s.tokens for s in segments) == 0:
        raise ShapeError("attention: the history holds no keys")
    b, h, _, d = q.shape
    segments = [s for s in segments if not isinstance(s, SpanPlan) or s.spans]
    h_kv = _kv_meta(segments[0])[0][1]
    for i, seg in enumerate(segments):
        shape, dtype, device = _kv_meta(seg)
        if shape[0] != b or shape[3] != d or shape[1] != h_kv or h % h_kv:
            raise ShapeError(
                f"attention: segment {i} has [B, H_kv, S, D] = {list(shape)}, q has [B, H, Sq, D] = "
                f"{list(q.shape)} (needs the same B and D, one H_kv for every segment, and H a multiple of it)"
            )
        if dtype not in FLOATS:
            raise DTypeError(f"attention: segment {i} holds {dtype}, not a float format")
        if device != q.device:
            raise DeviceError(f"attention: segment {i} is on {device}, q on {q.device}")


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, Sq, D] to k, v [B, H_kv, S, D] in fp32: (out [B, H, Sq, D], log-sum-exp
    of the scaled scores [B, H, Sq])."""
    group = q.shape[1] // k.shape[1]
    k, v = (repeat(t.float(), "b h s d -> b (h g) s d", g=group) for t in (k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse.unsqueeze(-1)), v), lse


def merge_torch(
    state: tuple[torch.Tensor, torch.Tensor] | None, *parts: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold partial attentions ``parts`` (out [B, H, Sq, D], lse [B, H, Sq]) into the running
    ``state`` (out fp32, lse fp32) over disjoint keys: ``state``'s tensors are updated in place and
    returned (``parts``' never are); None starts a new state. A row that no part has a key for
    (log-sum-exp -inf everywhere) stays output 0, log-sum-exp -inf. See
    :func:`qkv.kernels.merge_partials`."""
    lses = ([] if state is None else [state[1]]) + [lse.float() for _, lse in parts]
    lse = torch.stack(lses).logsumexp(0)
    empty = lse == -math.inf  # a row over no key yet: every weight 0, output 0
    ref = torch.where(empty, 0.0, lse)
    merged = sum(out.float() * torch.exp(part_lse - ref).unsqueeze(-1)
                 for out, part_lse in zip(([] if state is None else [state[0]]) + [o for o, _ in parts], lses))
    merged = torch.where(empty.unsqueeze(-1), 0.0, merged)
    if state is None:
        return merged.contiguous(), lse
    return state[0].copy_(merged), state[1].copy_(lse)


def attention_torch(q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over every key of ``segments``: [B, H, Sq, D] in q's dtype.

    Each segment is decompressed on its own (plain-torch kernels), attended to in fp32 and merged by
    log-sum-exp. ``scale`` defaults to 1 / sqrt(D).
    """
    check_attention(q, segments)
    scale = default_scale(q, scale)
    segments = [seg for seg in expand(segments) if seg.tokens]
    return _merged(q, scale, segments, lambda *args: [partial_attention(*args)], "torch")[0].to(q.dtype)


# Keys per piece of the decode path (the Triton kernel's work item on a GPU)
DECODE_PIECE = 256


def attention_decode_torch(q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None,
                           live: torch.Tensor | None = None) -> torch.Tensor:
    """Flash-decoding, the plain-torch twin of the decode kernel: every segment's keys cut into
    pieces of :data:`DECODE_PIECE`, each piece attended to in fp32 (all query heads of a KV head
    at once) and the partial results merged by log-sum-exp. [B, H, Sq, D] in q's dtype. ``live``:
    see :func:`qkv.kernels.attention` (read back here)."""
    check_attention(q, segments)
    scale = default_scale(q, scale)
    if live is not None:
        last, n = segments[-1], int(live)
        if not 0 <= n <= last.tokens:
            raise ShapeError(f"attention: live={n} keys of a last segment of {last.tokens}")
        segments = [*segments[:-1], DenseKV(last.k[:, :, :n], last.v[:, :, :n])]
    segments = [seg for seg in expand(segments) if seg.tokens]

    def pieces(q, k, v, scale):
        return [partial_attention(q, k[:, :, i : i + DECODE_PIECE], v[:, :, i : i + DECODE_PIECE], scale)
                for i in range(0, k.shape[2], DECODE_PIECE)]

    return _merged(q, scale, segments, pieces, "torch")[0].to(q.dtype)


def _merged(q, scale, segments, attend, backend) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend(q, k, v, scale)`` -> the partial results (out, lse) of each segment, decompressed on
    ``backend`` only when its turn comes, merged by log-sum-exp: (out, lse), both fp32."""
    state, pending = None, []
    for seg in segments:
        k, v = seg.materialize(backend=backend)
        pending += attend(q, k, v, scale)
        del k, v  # before the next segment is decompressed
        if len(pending) >= MERGE_PARTS:  # folded in at once: the state is read and written once
            state, pending = kernels.merge_partials(state, *pending, backend=backend), []
    if pending:
        state = kernels.merge_partials(state, *pending, backend=backend)
    if state is None:
        raise ShapeError("attention over no keys: the segments hold no token")
    return state


# torch's fused attention kernels that also return the log-sum-exp, fastest first on an H100 at
# video shapes (benchmarks/bench_attention.py, "sdpa_backends"): op -> its arguments after q, k, v
_LSE_OPS = {
    "_scaled_dot_product_cudnn_attention": (None, True),
    "_scaled_dot_product_flash_attention": (),
    "_scaled_dot_product_efficient_attention": (None, True),
}


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_attention` with torch's fused kernels: (out [B, H, Sq, D] in q's dtype, lse
    [B, H, Sq] fp32). On CUDA (fp16/bf16) the first of cuDNN, flash and memory-efficient attention
    that accepts the inputs; on the CPU the flash kernel for CPU; the fp32 einsum otherwise (and for
    queries and keys of different dtypes). Inputs whose D is not contiguous are copied first."""
    if q.dtype != k.dtype:
        return partial_attention(q, k, v, scale)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = (repeat(t, "b h s d -> b (h g) s d", g=group) for t in (k, v))
    # the fused kernels read rows of D contiguous values (the CPU one silently misreads others:
    # per-channel keys decompress as a transposed view)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    if q.dtype in (torch.float16, torch.bfloat16):
        for name in _LSE_OPS:
            try:
                return lse_op(name, q, k, v, scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # this kernel does not take these inputs (dtype, head dim, layout)
                continue
    return partial_attention(q, k, v, scale)


def lse_op(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse [B, H, Sq] fp32) of the torch op ``name`` of :data:`_LSE_OPS` (same heads for q,
    k, v); each op returns its log-sum-exp in its own shape (cuDNN [B, H, Sq, 1], memory-efficient
    padded along Sq)."""
    result = getattr(torch.ops.aten, name)(q, k, v, *_LSE_OPS[name], scale=scale)
    return result[0], result[1].flatten(2)[..., : q.shape[2]].float()


# Keys cut into this many equal pieces, attended to in one fused call as separate batch entries
# (the queries broadcast): as many thread blocks again, so the last wave of a chunk's 4,680 x 12
# query tiles leaves fewer multiprocessors idle (on an H100, one 37,440-token span: 0.85-0.89x the
# time of one piece; 3 or 4 pieces gain little more and cost more merges: benchmarks/
# bench_attention.py "key_split")
KEY_SPLIT = 2


def sdpa_split(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pieces: int = KEY_SPLIT
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sdpa_with_lse` over ``k``, ``v`` cut into ``pieces`` equal pieces along the keys, in
    one call: the partial result (out, lse) of each piece (one piece when the keys do not divide)."""
    n = pieces if k.shape[2] % pieces == 0 else 1
    if n == 1:
        return [sdpa_with_lse(q, k, v, scale)]
    k, v = (rearrange(t, "b h (n s) d -> (b n) h s d", n=n) for t in (k, v))  # views
    out, lse = sdpa_with_lse(repeat(q, "b h s d -> (b n) h s d", n=n), k, v, scale)
    return list(zip(rearrange(out, "(b n) h s d -> n b h s d", n=n), rearrange(lse, "(b n) h s -> n b h s", n=n)))


def attention_staged(
    q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """:func:`attention_torch` at the speed of torch's fused attention, in bounded memory. Keys of
    one dtype with q, :data:`STAGE_TOKENS` or fewer in all (a window: a sink, a few spans, the
    chunk being made), are gathered into one buffer (:func:`gather`) and attended to by one fused
    call, as a bf16 cache is. Otherwise the compressed spans are decompressed
    (:func:`qkv.kernels.decompress_spans` on ``backend``) a group of consecutive spans at a time,
    up to :data:`STAGE_TOKENS` keys (:func:`span_groups`), and each group is attended to by
    :func:`sdpa_split`; the full-precision segments are concatenated and attended to in one call;
    the partial results are merged by log-sum-exp. At most one decompressed group (or the
    concatenated full-precision keys) exists at a time. The full-precision keys come first: the
    GPU starts on them while the host prepares the first group. [B, H, Sq, D] in q's dtype."""
    check_attention(q, segments)
    scale = default_scale(q, scale)
    live = [seg for seg in segments if seg.tokens]
    if sum(seg.tokens for seg in live) <= STAGE_TOKENS and all(_kv_meta(seg)[1] == q.dtype for seg in live):
        k, v = gather(live, backend)
        return sdpa_with_lse(q, k, v, scale)[0]
    return attention_partial(q, segments, scale, backend)[0].to(q.dtype)


def gather(segments: Sequence[Segment], backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of every segment (one dtype), in order, in one buffer each
    [B, H_kv, S, D]: full-precision segments copied, spans decompressed in place
    (:func:`qkv.kernels.decompress_spans`, a plan's or loose spans' table in one launch)."""
    segments = [seg for seg in segments if seg.tokens]
    (b, h, _, d), dtype, device = _kv_meta(segments[0])
    total = sum(seg.tokens for seg in segments)
    k, v = (torch.empty(b, h, total, d, dtype=dtype, device=device) for _ in range(2))
    at = 0
    for seg in segments:
        n = seg.tokens
        if isinstance(seg, DenseKV):
            k[:, :, at : at + n].copy_(seg.k)
            v[:, :, at : at + n].copy_(seg.v)
        else:
            kernels.decompress_spans(seg if isinstance(seg, SpanPlan) else SpanPlan([seg]),
                                     k[:, :, at : at + n], v[:, :, at : at + n], backend=backend)
        at += n
    return k, v


def attention_partial(
    q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_staged` before its result is cast: (out [B, H, Sq, D] fp32, lse [B, H, Sq]
    fp32, the log-sum-exp of the scaled scores over every key of ``segments``), a partial result
    that :func:`qkv.kernels.merge_partials` merges with others over disjoint keys (ring attention:
    every rank attends to its own keys). ``segments`` must hold at least one key."""
    check_attention(q, segments)
    scale = default_scale(q, scale)
    dense = [s for s in segments if isinstance(s, DenseKV) and s.tokens]
    if len(dense) > 1:
        dense = [DenseKV(torch.cat([s.k for s in dense], 2), torch.cat([s.v for s in dense], 2))]
    plans = [s for s in segments if isinstance(s, SpanPlan)]
    loose = [s for s in segments if isinstance(s, CompressedSpan)]
    if loose:
        plans.append(SpanPlan(loose))
    groups = [g for plan in plans for g in plan.staged(STAGE_TOKENS)]
    return _merged(q, scale, dense + groups, sdpa_split, backend)
