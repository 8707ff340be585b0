"""Reading one layer of the streaming cache: the retained history decompressed
(:meth:`LayerReads.read`), as the attention kernels take it (:meth:`LayerReads.attention_segments`,
with the spans' :class:`~qkv.kernels.SpanPlan` made when they change and kept), and attention over
it (:meth:`LayerReads.attend`, by the paths of ``ATTENTION`` in cache_config.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qkv import kernels
from qkv.caches.layer_state import LayerState, check_chunk
from qkv.caches.tail import Chunk, extent, joined_kv
from qkv.errors import CacheError, ConfigError, ShapeError, shown
from qkv.validation import check_kv_layout


def _dense(chunks: list[Chunk]) -> list[kernels.DenseKV]:
    """``chunks`` as attention segments, adjacent views joined (one segment for a whole tail)."""
    ks, vs = joined_kv(chunks)
    if len(ks) != len(vs):
        return [kernels.DenseKV(c.k, c.v) for c in chunks]
    return [kernels.DenseKV(k, v) for k, v in zip(ks, vs)]


class LayerReads(LayerState):
    """The reading side of :class:`~qkv.caches.layer_cache.LayerCache`, which holds what it reads:
    sink, spans and tail (:class:`LayerState`), the tail buffer, the span plan and the replayed
    attend, and whose ``settle`` raises a failed value check of the appended chunks."""

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The retained history ``(k, v)``, each [B, H, tokens, D] in the appended dtype.

        Sink, then every span decompressed on its own (no decompressed span is kept), then the
        tail. For attention, :meth:`attend` avoids materializing this.
        """
        self.settle(wait=False)
        if self.layout is None:
            raise CacheError(f"layer {self.index} holds nothing yet: append a chunk first")
        ks, vs = [], []
        for c in self.sink:
            ks.append(c.k)
            vs.append(c.v)
        for sp in self.spans:
            k, v = sp.materialize(backend=self.config.backend)
            ks.append(k)
            vs.append(v)
        for c in self.tail:
            ks.append(c.k)
            vs.append(c.v)
        if not ks:
            b, h, d, dtype, device = self.layout
            empty = torch.empty(b, h, 0, d, dtype=dtype, device=device)
            return empty, empty.clone()
        return torch.cat(ks, 2), torch.cat(vs, 2)

    def segments(self) -> list:
        """The retained history as attention segments, in :meth:`read` order: a ``DenseKV`` per sink
        and tail chunk, a ``CompressedSpan`` per span (with its evicted ``skip`` tokens)."""
        return [kernels.DenseKV(c.k, c.v) for c in self.sink] + list(self.spans) + _dense(self.tail)

    def span_plan(self) -> kernels.SpanPlan:
        """The spans as one :class:`~qkv.kernels.SpanPlan` segment, made when the spans change (a
        new plan takes over the kernels' records of the spans it shares with the last one)."""
        if self._plan_stale:
            self._plan = kernels.SpanPlan(list(self.spans), previous=self._plan)
            self._plan_stale = False
        return self._plan

    def _tail_segments(self) -> list[kernels.DenseKV]:
        """The tail as attention segments: one view of the tail buffer when the tail is the run the
        last append laid out there (found without walking its chunks: token-by-token decoding
        appends a chunk a step), else :func:`_dense` of its chunks."""
        view = self.buffer.prefix(self.tail, extent(self.tail))
        return [kernels.DenseKV(*view)] if view is not None else _dense(self.tail)

    def attention_segments(self, extra: tuple[torch.Tensor, torch.Tensor] | None = None) -> list:
        """The history as the attention kernels take it (sink, the span plan, tail) plus ``extra``
        (k, v) last; written into the tail buffer's free room right after the tail when it fits
        there (the tail and extra then form one segment). The plan is the layer's own
        (:meth:`span_plan`), so every call over the same spans reuses its tables. A layer whose
        value check failed raises here too (:meth:`settle`, without waiting)."""
        self.settle(wait=False)
        segments = []
        if self.layout is not None:
            segments = [kernels.DenseKV(c.k, c.v) for c in self.sink] + [self.span_plan()] + self._tail_segments()
        if extra is None:
            return segments
        k, v = extra
        if torch.is_tensor(k) and torch.is_tensor(v) and k.dim() == 4 and k.shape == v.shape and k.dtype == v.dtype:
            staged = self.buffer.stage(self.tail, k.detach(), v.detach())
            if staged is not None:
                return segments[: len(segments) - (1 if self.tail else 0)] + [kernels.DenseKV(*staged)]
        return [*segments, kernels.DenseKV(k, v)]

    def attend(
        self,
        q: torch.Tensor,
        *,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of ``q`` [B, H, Sq, D] to every retained token, and to ``extra`` (k, v)
        [B, H_kv, S_e, D] (e.g. the current chunk, not stored) if given: [B, H, Sq, D] in q's dtype.

        Not causal: every query sees every key (the chunk-wise video pattern; for token-by-token
        decoding append first, then attend). H must be a multiple of the cache's heads (GQA).
        ``scale`` defaults to 1 / sqrt(D). ``config.attention`` picks how (``qkv.caches.ATTENTION``):
        ``"auto"``, ``"decode"``, ``"fused"`` and ``"staged"`` are :func:`qkv.kernels.attention`'s
        methods; ``"read"`` decompresses the whole history (:meth:`read`) for
        ``scaled_dot_product_attention``. With ``attend_graphs`` a few-query call without ``extra``
        may be replayed from a CUDA graph (:mod:`qkv.caches.attend_graphs`): its output is then the
        graph's own, which a later replay overwrites (clone it to keep it).
        """
        self._check_attend(q, extra, scale)
        if self.config.attention != "read":
            def eager() -> torch.Tensor:
                segments = self.attention_segments(extra)
                return kernels.attention(q, segments, scale=scale, backend=self.config.backend,
                                         method=self.config.attention)

            if extra is None and self.attend_graph is not None and self.layout is not None:
                self.settle(wait=False)
                return self.attend_graph.attend(self, q, scale, eager)
            return eager()
        if self.layout is None:
            k, v = extra
        else:
            k, v = self.read()
            if extra is not None:
                k, v = torch.cat([k, extra[0]], 2), torch.cat([v, extra[1]], 2)
        # in q's dtype, as the other modes compute in fp32 and return q's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])

    def _check_attend(self, q: object, extra: object, scale: object) -> None:
        """Typed errors for what :meth:`attend` cannot take: an empty layer without ``extra``, a
        ``q`` that is no float [B, H, Sq, D] tensor, an ``extra`` that is no (k, v) pair the layer
        could append, a non-finite ``scale``. Shapes, dtypes and devices only: the values of ``q``
        and ``extra`` are not read back (that would stall every call on the host and keep it out
        of a CUDA graph); a NaN query gives NaN outputs, and ``extra``'s values are checked when
        they are appended."""
        if self.layout is None and extra is None:
            raise CacheError(f"layer {self.index} holds nothing yet: append a chunk or pass extra")
        check_kv_layout("q", q)
        if extra is not None:
            if not isinstance(extra, tuple) or len(extra) != 2:
                raise ShapeError(f"layer {self.index}: extra must be a (k, v) tuple, got {type(extra).__name__}")
            check_chunk(self.config, self.layout, *extra, f"layer {self.index}: extra", values=False)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
            raise ConfigError(f"layer {self.index}: scale must be a finite number or None, got {shown(scale)}")

    def positions(self) -> torch.Tensor:
        """Absolute position of every retained token, in :meth:`read` order: int64 [tokens] (CPU).
        The sink holds positions from 0; after it, the ``evicted`` oldest are gone and the rest run
        up to ``seen``."""
        sink = sum(c.tokens for c in self.sink)
        return torch.cat([torch.arange(sink), torch.arange(sink + self.evicted, self.seen)])
