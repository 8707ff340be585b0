"""One layer of the streaming compressed KV cache: chunks appended, spans compressed once, history read.

A video generator (Self-Forcing, LongCat-Video, HY-WorldPlay) or an LLM decoder appends one chunk
of K/V per layer at a time and attends to everything cached. Per layer, :class:`LayerCache` keeps

- the **sink**: the first ``sink_chunks`` chunks (or ``sink_tokens`` tokens, cutting the chunk that
  crosses it), in full precision, never compressed nor evicted;
- the **spans**: a list of :class:`CompressedKV`, one per completed span (``span_chunks`` chunks, or
  ``span_tokens`` tokens), each compressed exactly once and never re-quantized;
- the **tail**: the newest chunks in full precision, until they complete a span (and, with
  ``recent_chunks=R``, until R newer chunks exist, so the newest R chunks are always exact). A policy's
  ``window(tokens=N)`` (KIVI's residual window) is honoured here: the newest N tokens stay in the
  tail, and spans are compressed with the window stripped (a window inside every span would keep N
  tokens of every span in full precision forever). Where the policy compresses groups of tokens
  on their own (``Policy.token_group``: KIVI's per-channel blocks of keys, per-token values), the
  window is a residual as in KIVI: every whole group that left it is compressed at once (spans of
  up to ``span_tokens`` in whole groups); otherwise a span waits until it is complete. Where every
  chunk completes a span on its own (spans no longer than a chunk: a rolling window evicting one
  chunk's tokens per chunk), the tail is no buffer but the few tokens left over, cut off and copied:
  nothing is allocated ahead.

``max_spans`` evicts the oldest spans (a sliding window over the compressed history);
:meth:`LayerCache.evict` drops any number of the oldest non-sink tokens: a span whose first tokens
are evicted drops them from its data where its format stores tokens on their own, and keeps (and
reports, ``CacheMemory.dead_tokens``) only those it cannot drop until all of its tokens are gone.

State lives here, never in the policy (policies are stateless). With ``warm_start=True`` (default)
every span's k-means starts from the previous span's centroids of the same layer, head and tensor
(the first span, and a span whose cluster count differs, start cold). ``benchmarks/warm_start_kmeans.py``
measured it on real K/V against the qvg presets' cold start (random seeding, as the reference): on
Wan video K/V warm reaches the cold error in 2.0x / 2.7x / 4.6x fewer iterations (cold 5 / 10 / 20),
and at the presets' 5 iterations its objective is 3.6% (video) / 0.7% (speech encoder) lower. A span's
heads are compressed in one call, and a head's result never depends on which other heads share it
(k-means's random draws are shared by all rows): that is what lets ranks that each hold some heads
(``qkv.caches.sharding``) produce exactly the unsharded cache.

:meth:`LayerCache.read` decompresses span by span (nothing decompressed is kept) and concatenates sink,
spans and tail. :meth:`LayerCache.attend` computes attention over the history as ``attention`` says
(``ATTENTION`` in cache_config.py, docs/attention.md): ``"auto"`` (default: the fastest path for the
call's query count), ``"decode"`` (flash-decoding over the compressed spans), ``"fused"`` (the
prefill kernel reads the compressed spans directly), ``"staged"`` (one span decompressed at a
time, torch's fused attention) or ``"read"`` (:meth:`read`, then ``scaled_dot_product_attention``).
The spans are handed to the kernels as one :class:`~qkv.kernels.SpanPlan`, made when the spans
change and kept: what the kernels need to read a span is built once, not on every call. The
reading side lives in :mod:`qkv.caches.layer_reads`, the state in :mod:`qkv.caches.layer_state`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from qkv import kernels
from qkv.caches.attend_graphs import AttendGraph
from qkv.caches.cache_config import CacheConfig, CacheMemory
from qkv.caches.checks import Pending, ValueChecks
from qkv.caches.heads import index_batch
from qkv.caches.layer_reads import LayerReads
from qkv.caches.layer_state import (
    LayerState,
    Layout,
    centroids_only,
    check_chunk,
    from_state_dict,
    shares_centroids,
    state_dict,
)
from qkv.caches.tail import GROWTH, Chunk, TailBuffer, extent, joined_kv
from qkv.component import check_int
from qkv.compressed import CompressedKV
from qkv.errors import (
    CacheError,
    DTypeError,
    GradientError,
    ShapeError,
    shown,
)
from qkv.io import load_device

__all__ = ["LayerCache"]


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _take(chunks: list[Chunk], n: int, held=lambda t: False) -> tuple[list[Chunk], list[Chunk]]:
    """Split ``chunks`` after ``n`` tokens (cutting at most one chunk in two): (front, rest). A cut
    chunk's two parts are views where ``held(its keys)`` (the tail buffer holds it: its room is
    reused by the next placement), copies otherwise (a view would keep the chunk's storage)."""
    front, rest, need = [], [], n
    for c in chunks:
        if need >= c.tokens:
            front.append(c)
            need -= c.tokens
        elif need > 0:
            cut = (lambda t: t) if held(c.k) else torch.clone
            front.append(Chunk(cut(c.k[:, :, :need]), cut(c.v[:, :, :need]), c.start))
            rest.append(Chunk(cut(c.k[:, :, need:]), cut(c.v[:, :, need:]), c.start + need))
            need = 0
        else:
            rest.append(c)
    return front, rest


def _fingerprint(*tensors: torch.Tensor) -> tuple:
    """Where and what ``tensors`` are (storage address, shape, strides, dtype, device, version
    counter): equal only for views of the same unchanged data."""
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version) for t in tensors)


def _drop_oldest(parts: list, tokens: int, cut) -> tuple[list, int]:
    """``parts`` (spans or chunks, oldest first) without their ``tokens`` oldest tokens: the parts
    they cover whole are dropped and the first one kept loses the rest (``cut(part, n)``);
    returns the parts kept and the tokens they did not cover."""
    kept = []
    for part in parts:
        if tokens >= part.tokens:
            tokens -= part.tokens
            continue
        kept.append(cut(part, tokens) if tokens else part)
        tokens = 0
    return kept, tokens


def _cat(chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``chunks`` as one tensor each: a view when they are adjacent views of
    the tail buffer (the usual case), a concatenated copy otherwise."""
    ks, vs = joined_kv(chunks)
    return (ks[0] if len(ks) == 1 else torch.cat(ks, 2)), (vs[0] if len(vs) == 1 else torch.cat(vs, 2))


class LayerCache(LayerReads):
    """One layer's streaming cache (see the module docstring): its :class:`LayerState` (sink,
    spans, tail, warm start, counters, layout) and the tail buffer the tail's chunks are views of.
    Tensors are ``[B, H, S, D]``."""

    def __init__(self, config: CacheConfig, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.window: int | None = None  # see bound_to
        self.reset()

    def bound_to(self, window: int | None) -> None:
        """Declare that the caller keeps at most ``window`` retained tokens after the sink between
        calls (a rolling window it evicts to with :meth:`evict`; None: no bound). The tail buffer
        is then never planned beyond the window (with room to slide: ``GROWTH`` times it) plus one
        chunk, and an eviction that leaves it larger moves the tail into a buffer of that size, so
        a long chunk (a prompt) does not keep its room once the window has cut it. Stays until
        changed (not undone by :meth:`reset`)."""
        if window is not None:
            check_int("bound_to", "window", window, 1)
        self.window = window
        self.attend_graph = self._attend_graph()
        self._shrink_buffer()

    def _attend_graph(self) -> AttendGraph | None:
        """The layer's replayed attend (``attend_graphs``), except under a window bound: a layer
        that evicts at every step (a sliding window) never attends to the same history twice."""
        return AttendGraph() if self.config.attend_graphs and self.window is None else None

    def _room(self, tokens: int) -> int | None:
        """The most tail-buffer room an append of ``tokens`` may plan (None: no bound)."""
        return None if self.window is None else math.ceil(GROWTH * self.window) + tokens

    def _shrink_buffer(self) -> None:
        """Move the tail into a buffer of :meth:`_room` (or of what the last chunk's size plans,
        if less) if the bound makes the current one too large (one copy of at most the window)."""
        room = self._room(0)
        if room is None:
            return
        room = min(room, self._planned(self.buffer.last_chunk)) if self.buffer.last_chunk else room
        if self.buffer.capacity > room and extent(self.tail) <= room:
            self.tail = self.buffer.moved(self.tail, room)

    def reset(self) -> None:
        """Forget everything (the layer takes a new batch/head layout on its next append)."""
        LayerState.__init__(self)
        self.buffer = TailBuffer()
        self._forget_plan()
        # compress_ahead's span: (fingerprint, warm start, span, its chunk's value check and the
        # chunk's tensors' indices in it)
        self._ahead: tuple[tuple, CompressedKV | None, CompressedKV, tuple | None] | None = None
        self.checks = ValueChecks(f"layer {self.index}")  # the appended chunks' (qkv.caches.checks)
        self.attend_graph = self._attend_graph()

    def replace(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace everything the layer holds by the chunk ``k``, ``v`` (:meth:`reset`, then
        :meth:`append`), keeping the warm-start centroids: the chunk's k-means starts from those
        of the spans it replaces (with ``warm_start``, and where batch, heads and cluster count
        match). For a window that is re-encoded as a whole and overlaps the last one, such as
        AnyFlow-FAR's full-resolution context. A chunk :meth:`append` would refuse leaves the
        layer unchanged."""
        self.settle(wait=False)
        if self._append_token(k, v):
            return
        ahead = self._ahead if self._is_ahead(k, v) else None
        check_chunk(self.config, None, k, v, f"layer {self.index}", values=False)
        self._refuse_grad(k, v)
        pending = self._check_values(k, v, ahead, 0)
        warm = self.warm
        self.reset()
        self.warm, self._ahead = warm, ahead
        self._store(k, v)
        self.checks.pending += pending

    def _forget_plan(self) -> None:
        """Drop what attention derived from the spans (made again on the next attend)."""
        self._plan: kernels.SpanPlan | None = None
        self._plan_stale = True  # the spans changed since the plan was made

    def state_dict(self) -> dict:
        """The layer's state as plain data (see :mod:`qkv.caches.layer_state`; tensors shared),
        after every pending value check (:meth:`settle`): no state of unchecked chunks leaves."""
        self.settle()
        return state_dict(self)

    def load_state_dict(self, data: dict, device: str | torch.device = "cpu") -> None:
        """Replace the state by ``data`` (a :meth:`state_dict`, tensors on ``device``), after
        checking that it adds up (:func:`~qkv.caches.layer_state.from_state_dict`); raises
        :class:`CorruptDataError` and leaves the layer unchanged if not. What the layer held goes,
        with its pending value checks and a refusal (:meth:`settle`), as with :meth:`reset`."""
        state = from_state_dict(self.config, data, load_device(device), f"layer {self.index}")
        for f in dataclasses.fields(LayerState):
            setattr(self, f.name, getattr(state, f.name))
        self.buffer = TailBuffer()  # the next append copies the tail into a buffer
        self._forget_plan()
        self._ahead, self.checks = None, ValueChecks(f"layer {self.index}")

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """Retained tokens (what :meth:`read` returns along S); the spans' count from the current
        plan where there is one (decoding with KIVI makes a span every 32 tokens: no walk)."""
        plan = self._plan if not self._plan_stale else None
        spans = plan.tokens if plan is not None else sum(s.tokens for s in self.spans)
        return sum(c.tokens for c in self.sink) + spans + extent(self.tail)

    def memory(self) -> CacheMemory:
        """Exact stored bytes of this layer, by part."""
        shared = {id(s.centroids) for sp in self.spans for ct in (sp.ckv.k, sp.ckv.v) for s in ct.stages}
        warm = 0
        if self.warm is not None:
            warm = sum(
                _nbytes(s.centroids)
                for ct in (self.warm.k, self.warm.v)
                for s in ct.stages
                if id(s.centroids) not in shared
            )
        b, h, d = self.layout[:3] if self.layout else (0, 0, 0)
        tail = sum(_nbytes(c.k, c.v) for c in self.tail)
        in_buffer = sum(_nbytes(c.k, c.v) for c in self.tail if self.buffer.holds(c.k))
        return CacheMemory(
            compressed=sum(sp.ckv.nbytes for sp in self.spans) + (self._ahead[2].nbytes if self._ahead else 0),
            sink=sum(_nbytes(c.k, c.v) for c in self.sink),
            tail=tail,
            warm_start=warm,
            reserved=self.buffer.nbytes - in_buffer,
            tokens=self.tokens,
            elements=2 * b * h * d * self.tokens,
            dead_tokens=sum(sp.skip for sp in self.spans),
        )

    # -- writing -------------------------------------------------------------------------------
    def _is_ahead(self, k: object, v: object) -> bool:
        """Whether :meth:`KVCache.compress_ahead` compressed (and checked) this very chunk."""
        return self._ahead is not None and torch.is_tensor(k) and torch.is_tensor(v) and self._ahead[0] == _fingerprint(k, v)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one chunk ``k``, ``v`` [B, H, S_chunk, D] (fp32/fp16/bf16, copied).

        Bad chunks (rank, shape, dtype or device unlike the cache's, NaN/Inf) raise a typed error
        and leave the layer unchanged, as does a chunk that requires grad while grad is enabled
        (:class:`GradientError`: what is stored is detached, its gradient would be lost). Spans
        completed by this chunk are compressed now, once. On a GPU the values are checked without
        waiting for the device (:mod:`qkv.caches.checks`: chunks the tail takes, 32 tokens at a
        time): a NaN/Inf chunk is stored, and the layer raises its error from the first call after
        the verdict arrives, and refuses every call until :meth:`reset` (:meth:`settle`).
        """
        self.settle(wait=False)
        if self._append_token(k, v):
            return
        ahead = self._ahead if self._is_ahead(k, v) else None
        check_chunk(self.config, self.layout, k, v, f"layer {self.index}", values=False)
        self._refuse_grad(k, v)
        batched = (self.config.validate and ahead is None and self.checks.batches(k)
                   and self._sink_takes(k.shape[2]) == 0)
        pending = [] if batched else self._check_values(k, v, ahead, self.seen)
        mark = self.checks.mark()
        self.checks.unchecked += k.shape[2] if batched else 0
        try:
            self._store(k, v)
        except BaseException:  # the chunk is not stored: neither are the checks made for it
            self.checks.restore(mark)
            raise
        self.checks.pending += pending
        self.checks.flush_if_full(self.tail, self.buffer)

    def _append_token(self, k: object, v: object) -> bool:
        """:meth:`append` of the chunk token-by-token decoding appends at every layer and step,
        with the least host work: one token of the layer's layout, not needed by the sink, which
        the tail buffer takes right after the tail, its value check batched (on a GPU) or off.
        False, with nothing done, for any other chunk (:meth:`append` takes it the general way,
        checks and errors included)."""
        layout, tail, buf, cfg, checks = self.layout, self.tail, self.buffer, self.config, self.checks
        if (layout is None or self._ahead is not None or type(k) is not torch.Tensor or type(v) is not torch.Tensor
                or not buf.is_run(tail) or buf.end >= buf.capacity):
            return False
        b, h, d, dtype, device = layout
        if (k.shape != (b, h, 1, d) or v.shape != k.shape or k.dtype != dtype or v.dtype != dtype
                or k.device != device or v.device != device or ((k.requires_grad or v.requires_grad) and torch.is_grad_enabled())):
            return False
        batched = cfg.validate and checks.batches(k)
        one_token_spans = cfg.residual_group is None and (cfg.span_tokens if cfg.span_chunks is None else cfg.span_chunks) == 1
        if (cfg.validate and not batched) or one_token_spans or self._sink_takes(1):
            return False
        mark = checks.mark()
        checks.unchecked += batched
        tail.append(buf.put(tail, k, v, self.seen))
        if self._next_span(tail):  # the token completes a span: compressed as append does
            self.tail = tail[:-1]  # unchanged if the compression fails
            try:
                self._take_spans(*self._complete_spans(tail))
            except BaseException:
                checks.restore(mark)
                raise
        self.seen += 1
        checks.flush_if_full(self.tail, self.buffer)
        return True

    def _check_values(self, k: torch.Tensor, v: torch.Tensor, ahead: tuple | None, start: int) -> list[Pending]:
        """The value check of a chunk about to be stored as tokens ``start`` on, with ``validate``
        (:meth:`ValueChecks.chunk`: raising off a GPU; on a GPU queued, or the one
        :meth:`KVCache.compress_ahead` made for it), for :attr:`checks` once it is stored."""
        if not self.config.validate or (ahead is not None and ahead[3] is None):
            return []
        return self.checks.chunk(k, v, start, None if ahead is None else ahead[3])

    def settle(self, wait: bool = True) -> None:
        """Raise the error of a chunk whose value check failed (appended on a GPU, where the
        check runs without waiting: see ``validate`` in docs/cache.md), and refuse every later call
        until :meth:`reset`. ``wait``: check the tokens still waiting for a batch and wait for the
        checks on their way (False: look at those that have arrived). Appending, attending and
        reading look without waiting; a state that leaves the layer (:meth:`state_dict`, :meth:`to`)
        waits."""
        self.checks.settle(self.tail, self.buffer, wait)

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`append` of a chunk already checked."""
        layout = self.layout or Layout.of(k)
        k, v, start = k.detach(), v.detach(), self.seen
        take = self._sink_takes(k.shape[2])
        if take:
            self.sink.append(Chunk(k[:, :, :take].clone(), v[:, :, :take].clone(), start))
        if take < k.shape[2]:
            self._append_tail(k[:, :, take:], v[:, :, take:], start + take, k.shape[2])
        self.layout = layout
        self.seen += k.shape[2]
        self._ahead = None  # made for this append (used by now) or for a chunk that did not come

    def _sink_takes(self, tokens: int) -> int:
        """How many of the next chunk's ``tokens`` the sink keeps: all of a chunk while the sink
        holds fewer than ``sink_chunks`` chunks and every token so far, else up to ``sink_tokens``."""
        if len(self.sink) < self.config.sink_chunks and self.seen == sum(c.tokens for c in self.sink):
            return tokens
        return min(tokens, max(self.config.sink_tokens - self.seen, 0))

    def _refuse_grad(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise GradientError(
                f"layer {self.index}: the chunk requires grad, but the cache stores detached (compressed) copies; "
                "append it under torch.no_grad() or detach it to store it without its gradient"
            )

    def _append_tail(self, k: torch.Tensor, v: torch.Tensor, start: int, chunk: int) -> None:
        """Add ``k``, ``v`` (the chunk of ``chunk`` tokens, or what the sink left of it) to the tail
        and compress the spans it completes; the layer is unchanged if a compression fails."""
        fresh = Chunk(k, v, start)
        if self.config.residual_group is None and self._next_span([fresh]):  # a span per chunk: no buffer
            new_spans, tail, warm = self._complete_spans([*self.tail, fresh])
            tail = [Chunk(c.k.clone(), c.v.clone(), c.start) if c.k is k else c for c in tail]
            if not any(self.buffer.holds(c.k) for c in tail):
                self.buffer = TailBuffer()
        else:
            tail = self.buffer.append(self.tail, k, v, start, self._planned(chunk), self._room(k.shape[2]))
            self.tail = tail[:-1]  # possibly moved, same values: unchanged if a compression fails
            new_spans, tail, warm = self._complete_spans(tail)
        self._take_spans(new_spans, tail, warm)

    def _take_spans(self, new_spans: list[kernels.CompressedSpan], tail: list[Chunk], warm: CompressedKV | None) -> None:
        """Keep what :meth:`_complete_spans` made: the spans, the tail after them, the warm start."""
        self.tail, self.warm = tail, warm
        self.spans.extend(new_spans)
        self._slide()
        if new_spans:
            self._plan_stale = True

    def _planned(self, tokens: int) -> int:
        """Tail buffer capacity for chunks of ``tokens``: a span, the tokens kept in full precision
        after it, and one chunk more (the next append, or the current chunk :meth:`attend` stages).
        With a residual window every whole group that left the window goes at each append, so the
        tail holds less than the window and a group before the next chunk; chunks shorter than
        that (token-by-token decoding) get room for as many tokens again, so that the tail, a
        chunk per token, moves to the buffer's front once per window and group, not once per
        group (a move walks and re-views every chunk of the tail)."""
        cfg = self.config
        keep = max(cfg.recent_chunks * tokens, cfg.fp_window)
        if cfg.residual_group is not None:
            return keep + cfg.residual_group + max(tokens, keep + cfg.residual_group)
        span = cfg.span_chunks * tokens if cfg.span_chunks is not None else cfg.span_tokens
        return span + keep + tokens

    def _next_span(self, tail: list[Chunk]) -> int:
        """Tokens of the span to compress now at the front of ``tail`` (0: none is complete).

        A span is ``span_chunks`` chunks or ``span_tokens`` tokens, compressed once complete with
        at least the policy's window (and the ``recent_chunks``) after it; a window that is a
        residual (``config.residual_group``) instead lets every whole group of tokens that left it
        go at once, up to a span's length in whole groups (at least one group)."""
        cfg = self.config
        have = extent(tail)
        recent = sum(c.tokens for c in tail[len(tail) - cfg.recent_chunks :]) if cfg.recent_chunks else 0
        keep = max(cfg.fp_window, recent)
        if cfg.span_chunks is not None:
            n, complete = sum(c.tokens for c in tail[: cfg.span_chunks]), len(tail) >= cfg.span_chunks
        else:
            n, complete = cfg.span_tokens, have >= cfg.span_tokens
        group = cfg.residual_group
        if group is None:
            return n if complete and have - n >= keep else 0
        n = min(max(group, n - n % group), max(have - keep, 0))
        return n - n % group

    def _complete_spans(self, tail: list[Chunk]) -> tuple[list[kernels.CompressedSpan], list[Chunk], CompressedKV | None]:
        """Compress every complete span at the front of ``tail``: (new spans, remaining tail, warm)."""
        spans, warm = [], self.warm
        while n := self._next_span(tail):
            if n > extent(tail) - self.checks.unchecked:  # the span takes tokens still to be checked
                self.checks.flush(tail, self.buffer)
            view = self.buffer.prefix(tail, n)  # the tail as laid out by the append: no walk
            head, rest = _take(tail, n, self.buffer.holds)
            k, v = view if view is not None else _cat(head)
            self.buffer.follow(tail, rest)
            tail = rest
            ckv = self._compress(k, v, warm)
            spans.append(kernels.CompressedSpan(ckv))
            if self.config.warm_start and self.config.clusters:
                warm = centroids_only(ckv)
        return spans, tail, warm

    def _warm_fits(self, warm: CompressedKV, shape: torch.Size) -> bool:
        """A warm start only for the batch and heads of a span of ``shape`` [B, H, S, D], with the
        groups a fresh clustering of its S tokens would have."""
        policy = self.config.policy
        return policy.k.fits_warm_start(warm.k, shape) and policy.v.fits_warm_start(warm.v, shape)

    def _fitting(self, warm: CompressedKV | None, shape: torch.Size) -> CompressedKV | None:
        """``warm`` if a span of ``shape`` can start from it (:meth:`_warm_fits`), else None."""
        return warm if warm is not None and self._warm_fits(warm, shape) else None

    def _compress(self, k: torch.Tensor, v: torch.Tensor, warm: CompressedKV | None) -> CompressedKV:
        warm = self._fitting(warm, k.shape)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == _fingerprint(k, v) and ahead[1] is warm:
            return ahead[2]  # compress_ahead made it from these very tensors and warm start
        # every chunk was checked as it came (or the config says not to check)
        return self.config.span_policy.compress(k, v, warm_start=warm, backend=self.config.backend, validate=False,
                                                graphs=self.config.graphs)

    def ahead_request(self, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple, CompressedKV | None] | None:
        """What :meth:`append` of ``k``, ``v`` would compress, when the chunk alone is one span
        compressed on arrival (a span per chunk, past the sink, nothing waiting in the tail) and
        not compressed ahead yet: (the chunk's fingerprint, the warm start it would take); None
        otherwise. See :meth:`KVCache.compress_ahead`."""
        cfg = self.config
        if cfg.residual_group is not None or self.tail or not torch.is_tensor(k) or not torch.is_tensor(v):
            return None
        sink = sum(c.tokens for c in self.sink)
        if (len(self.sink) < cfg.sink_chunks and self.seen == sink) or self.seen < cfg.sink_tokens:
            return None  # the sink takes (some of) it
        if k.dim() != 4 or self._next_span([Chunk(k, v, self.seen)]) != k.shape[2]:
            return None
        key = _fingerprint(k, v)
        if self._ahead is not None and self._ahead[0] == key:
            return None
        return key, self._fitting(self.warm, k.shape)

    def trim(self) -> None:
        """Free the tail buffer (its room is ``memory().reserved``) for a layer appended to once or
        rarely, such as a one-shot condition or a store of frames: tail chunks held there are
        copied out first, and the next append allocates a buffer again."""
        self.tail = [Chunk(c.k.clone(), c.v.clone(), c.start) if self.buffer.holds(c.k) else c for c in self.tail]
        self.buffer = TailBuffer()

    def _slide(self) -> None:
        limit = self.config.max_spans
        while limit is not None and len(self.spans) > limit:
            self.evicted += self.spans.pop(0).tokens

    def evict(self, tokens: int) -> None:
        """Drop the ``tokens`` oldest retained tokens after the sink (spans first, then the tail).

        A span whose first tokens go drops them from its data where its format stores tokens on
        their own (per-token codes, casts, whole per-channel blocks: new, smaller storage) and
        skips the rest, which stay stored (``memory().dead_tokens``) until the span goes."""
        check_int("evict", "tokens", tokens, 0)
        available = sum(s.tokens for s in self.spans) + extent(self.tail)
        if tokens > available:
            raise CacheError(f"layer {self.index}: cannot evict {tokens} tokens, {available} are evictable")
        if tokens > available - self.checks.unchecked:  # the eviction reaches tokens still to be checked
            self.checks.flush(self.tail, self.buffer)
        spans, left = _drop_oldest(self.spans, tokens, self._cut)
        self.spans, self.tail = spans, _drop_oldest(self.tail, left, self._cut_chunk)[0]
        self.evicted += tokens
        self._plan_stale = True
        self._shrink_buffer()

    @staticmethod
    def _cut(span: kernels.CompressedSpan, tokens: int) -> kernels.CompressedSpan:
        """``span`` without its ``tokens`` oldest retained tokens: dropped from its data where the
        format can drop them (:meth:`CompressedKV.drop_leading`), skipped otherwise."""
        skip = span.skip + tokens
        ckv, dropped = span.ckv.drop_leading(skip)
        return kernels.CompressedSpan(ckv, skip - dropped)

    def _cut_chunk(self, c: Chunk, tokens: int) -> Chunk:
        """``c`` without its ``tokens`` oldest tokens: a view where it lives in the tail buffer
        (whose freed room the next placement reuses), a copy otherwise (a view would keep the
        evicted tokens' storage alive)."""
        if self.buffer.holds(c.k):
            return Chunk(c.k[:, :, tokens:], c.v[:, :, tokens:], c.start + tokens)
        return Chunk(c.k[:, :, tokens:].clone(), c.v[:, :, tokens:].clone(), c.start + tokens)

    def drop_newest(self, tokens: int) -> None:
        """Forget the ``tokens`` newest tokens (assisted decoding's rejected candidates). They must
        all be in the full-precision tail: compressed spans are never rolled back (``recent_chunks``
        keeps the newest chunks there)."""
        check_int("drop_newest", "tokens", tokens, 0)
        in_tail = extent(self.tail)
        if tokens > in_tail:
            raise CacheError(
                f"layer {self.index}: cannot drop the {tokens} newest tokens, only {in_tail} are in the "
                "full-precision tail (compressed spans are never rolled back; keep recent_chunks >= 1)"
            )
        self.checks.flush(self.tail, self.buffer)  # the dropped tokens were appended: their verdict stands
        tail, left = list(self.tail), tokens
        while left:
            c = tail.pop()
            if c.tokens > left:
                tail.append(Chunk(c.k[:, :, : c.tokens - left], c.v[:, :, : c.tokens - left], c.start))
            left -= min(left, c.tokens)
        self.tail = tail
        self.seen -= tokens

    # -- batch / device ------------------------------------------------------------------------
    def warm_shares_newest_span(self) -> bool:
        """Whether the warm-start centroids are those of the newest stored span (shared storage)."""
        return self.warm is not None and bool(self.spans) and shares_centroids(self.warm, self.spans[-1].ckv)

    def index_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (1-D integer tensor or sequence, each in [0, B); beam search
        reorders, repeats or selects rows)."""
        index = self._rows(index)
        if self.layout is None:
            return
        self.checks.flush(self.tail, self.buffer)  # rows may go

        def rows(c: Chunk) -> Chunk:
            return Chunk(c.k.index_select(0, index.to(c.k.device)), c.v.index_select(0, index.to(c.v.device)), c.start)

        shared = self.warm_shares_newest_span()
        self.sink = [rows(c) for c in self.sink]
        self.tail = [rows(c) for c in self.tail]
        self.buffer = TailBuffer()  # the next append copies the new tail into a new buffer
        self.spans = [dataclasses.replace(s, ckv=index_batch(s.ckv, index)) for s in self.spans]
        self._plan_stale = True
        if self.warm is not None:
            self.warm = centroids_only(self.spans[-1].ckv) if shared else index_batch(self.warm, index)
        self.layout = self.layout._replace(batch=len(index))

    def _rows(self, index: object) -> torch.Tensor:
        """``index`` as a 1-D int64 tensor of batch rows of this layer, else a typed error."""
        where = f"layer {self.index}: index_batch"
        try:
            rows = torch.as_tensor(index)
        except (TypeError, ValueError, RuntimeError):
            raise DTypeError(f"{where}: index must be a 1-D integer tensor or sequence, got {shown(index)}") from None
        if rows.dim() != 1 or not rows.numel():
            raise ShapeError(f"{where}: index must be 1-D and keep at least one row, got shape {tuple(rows.shape)}")
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
            raise DTypeError(f"{where}: index must hold integers, got {rows.dtype}")
        rows = rows.to(torch.long)
        if self.layout is not None:
            bad = rows[(rows < 0) | (rows >= self.layout.batch)]
            if bad.numel():
                raise CacheError(f"{where}: row {int(bad[0])} outside the layer's {self.layout.batch} batch rows")
        return rows

    def to(self, device: str | torch.device) -> "LayerCache":
        """Move everything stored to ``device`` (in place) and return this layer, as
        ``torch.nn.Module.to`` does (so ``layer.to(device)`` can stand where a tensor's would)."""
        device = torch.device(device)
        self.settle()

        def move(c: Chunk) -> Chunk:
            return Chunk(c.k.to(device), c.v.to(device), c.start)

        shared = self.warm_shares_newest_span()
        self.sink = [move(c) for c in self.sink]
        self.tail = [move(c) for c in self.tail]
        self.buffer = TailBuffer()  # the next append copies the tail into a buffer on ``device``
        self.spans = [dataclasses.replace(s, ckv=s.ckv.to(device)) for s in self.spans]
        self._plan_stale = True
        if self.warm is not None:
            self.warm = centroids_only(self.spans[-1].ckv) if shared else self.warm.to(device)
        if self.layout is not None:
            self.layout = self.layout._replace(device=device)
        return self
