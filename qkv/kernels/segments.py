"""The segments of a KV history that attention reads, and the plan of its compressed spans.

A history is a sequence of segments: :class:`DenseKV` (keys and values in full precision) and
:class:`CompressedSpan` (a :class:`~qkv.compressed.CompressedKV`, which describes itself, and how
many of its leading tokens were evicted), or a :class:`SpanPlan`: spans whose records the kernels
read, made once when the spans change and reused by every call (with the staged path's groups,
:func:`span_groups`). :func:`decompress_spans_torch` is the reference for decompressing a plan's
spans into one buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from qkv import kernels
from qkv.compressed import CompressedKV
from qkv.errors import DTypeError, ShapeError
from qkv.format import Undo


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
        metas = ([previous.meta] if base else []) + [kv_meta(sp) for sp in added]
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

    def materialize(self, backend: str = "auto",
                    rotated: tuple[bool, bool] = (False, False)) -> tuple[torch.Tensor, torch.Tensor]:
        """The live keys and values of every span, in order, in one buffer each
        ([B, H_kv, tokens, D], the spans' dtype): :func:`qkv.kernels.decompress_spans`."""
        (b, h, tokens, d), dtype, device = self.meta
        k, v = (torch.empty(b, h, tokens, d, dtype=dtype, device=device) for _ in range(2))
        kernels.decompress_spans(self, k, v, backend=backend, rotated=rotated)
        return k, v

    def rotations(self) -> tuple[bool, bool]:
        """For K and for V: whether every span's tensor is Hadamard-rotated once, so that the spans
        can be read in their stored (rotated) basis with rotated queries (``materialize(rotated=...)``);
        made once."""

        def build():
            def stored(ct) -> bool:
                return ct.format.undo is Undo.ROTATE and len(ct.stages) == 1

            return tuple(bool(self.spans) and all(stored(getattr(sp.ckv, t)) for sp in self.spans) for t in "kv")

        return self.table(("rotations",), build)


def decompress_spans_torch(plan: SpanPlan, k_out: torch.Tensor, v_out: torch.Tensor,
                           rotated: tuple[bool, bool] = (False, False)) -> None:
    """The live keys and values of every span of ``plan``, in order, written into ``k_out`` /
    ``v_out`` [B, H_kv, plan.tokens, D] (checked by :func:`qkv.kernels.decompress_spans`): span by
    span with :func:`qkv.kernels.decompress` (a partly evicted span decompressed whole, its live
    tokens copied); ``rotated``: its argument, for K and for V."""
    at = 0
    for sp in plan.spans:
        for buf, ct, rot in ((k_out, sp.ckv.k, rotated[0]), (v_out, sp.ckv.v, rotated[1])):
            live = buf[:, :, at : at + sp.tokens]
            if sp.skip:
                live.copy_(kernels.decompress(ct, backend="torch", rotated=rot)[:, :, sp.skip :])
            else:
                kernels.decompress(ct, out=live, backend="torch", rotated=rot)
        at += sp.tokens


Segment = DenseKV | CompressedSpan | SpanPlan


def expand(segments: Sequence[Segment]) -> list[DenseKV | CompressedSpan]:
    """``segments`` with every :class:`SpanPlan` replaced by its spans."""
    out: list = []
    for seg in segments:
        out.extend(seg.spans if isinstance(seg, SpanPlan) else (seg,))
    return out


def kv_meta(seg: Segment) -> tuple[tuple[int, ...], torch.dtype, torch.device]:
    """The (shape [B, H_kv, S, D], dtype, device) of a segment's keys and values, checked to agree
    (a span's evicted tokens within it)."""
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
