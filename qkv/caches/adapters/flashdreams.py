"""flashdreams' streaming Wan (``recipes/wan``) on a qkv cache.

flashdreams 0.1.0 builds each transformer block's self-attention cache with
``SelfAttention.initialize_cache`` (a ``BlockKVCache``, ``core/attention/kvcache.py``: [sink |
rolling window] buffers of ``[B, S, H, D]``, ``before_update(chunk_idx)`` / ``update(k, v)`` /
``after_update(chunk_idx)``; the same ``chunk_idx`` again rewrites the chunk, the next one rolls
the window left by a chunk once it is full) and attends with ``apply_kv``: queries against the
whole ``cached_k()`` / ``cached_v()`` buffer.

:func:`install` keeps that protocol and replaces the two pieces on each block's ``self_attn``
instance: ``initialize_cache`` returns a :class:`QKVBlockCache` (same protocol, backed by a
:class:`~qkv.KVCache` layer: the chunk being denoised is kept in full precision, appended once
when the next chunk starts, the window slides by ``LayerCache.evict`` after a sink of whole
chunks), and ``apply_kv`` attends with ``cache.attend(layer, q, extra=chunk)`` over the compressed
spans instead of reading the buffer. Everything else (q/k/v, RMS norms, RoPE before caching, the
network's ``before_update`` / ``after_update`` calls, cross-attention) is flashdreams' own.

    handle = qkv.adapters.flashdreams.install(network, "qvg")   # a WanDiTNetwork (or .network)
    cache = network.initialize_cache(chunk_size, window_size, sink_size, text)   # unchanged

Context parallelism (``network.set_context_parallel_group``, ``core/attention/cp.py``; each rank
gets its token shard of every chunk) is kept, as :mod:`~qkv.caches.adapters.context_parallel`
does it for diffusers:

- **ring**: a rank's cache holds its token shard of every chunk (upstream's buffer holds the same).
  Upstream all-gathers every rank's whole buffer for each attention; here the queries of all ranks
  are gathered instead, every rank attends all of them to its own compressed shard and chunk, and
  one all-to-all hands each rank its queries' partial results, merged by log-sum-exp.
- **ulysses**: the chunk's K/V go through upstream's all-to-all once, when written: a rank's cache
  holds all tokens of its ``H / cp`` heads (upstream holds the token shard of every head and
  all-to-alls the whole buffer at each attention); the queries and the output take the same
  all-to-alls as upstream's.

Not supported (typed errors at install or first use): keys roped relative to the cache
(``apply_rope_before_kvcache=False``: every read would need the history decompressed to re-rope
it), a sink that is not whole chunks, and CUDA-graph capture of the forward (the cache's tensors
change shape as it grows; a transformer built with ``use_cuda_graph=True`` is refused at install).
"""

from __future__ import annotations

import dataclasses
import math
import types
import weakref

import torch

from qkv.caches.adapters.context_parallel import ContextParallel
from qkv.caches.adapters.handle import AdapterHandle, attend_parts
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.component import check_int
from qkv.errors import CacheError, ConfigError

__all__ = ["FinalPass", "FlashDreamsHandle", "QKVBlockCache", "install"]


def parallel_of(attn) -> ContextParallel | None:
    """The context parallelism flashdreams set on a block's attention (``set_context_parallel_group``),
    as a :class:`ContextParallel` of one ring or one Ulysses group, or None."""
    mesh = attn.attn_op.device_mesh
    if mesh is None or mesh.size() == 1:
        return None
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    if attn.attn_op.method == "ring":
        return ContextParallel(None, 1, 0, group, world, rank)
    return ContextParallel(group, world, rank, None, 1, 0)


@dataclasses.dataclass(eq=False)
class FinalPass:
    """Stores the finished chunks of one :class:`KVCache`'s blocks ``blocks_per_pass`` at a time,
    each pass one :meth:`KVCache.compress_ahead` (one encode for several layers instead of one a
    layer). flashdreams ends or starts every block's chunk in a loop with nothing else queued on
    the GPU (``NetworkCache.after_update`` once the forward is done, ``before_update`` before the
    next), so a per-block encode's host time (~60 launches) would be its time. Two ways in:

    - :meth:`add`: a block whose chunk had its last write (``finalize_kv_cache``) ended its
      update; stored once ``blocks_per_pass`` wait, or with the last block's;
    - :meth:`store_finished`: a block starts the next chunk (the network driven alone), so every
      block of the cache holding the chunk before it is stored now (upstream moves all blocks on
      together); a block stored so is then refused a rewrite of that chunk.

    ``blocks``: the cache's blocks (weakly: a cache flashdreams dropped is not kept alive)."""

    cache: KVCache
    blocks_per_pass: int
    waiting: list = dataclasses.field(default_factory=list)
    blocks: weakref.WeakSet = dataclasses.field(default_factory=weakref.WeakSet)

    def add(self, block: "QKVBlockCache") -> None:
        self.waiting.append(block)
        if len(self.waiting) >= self.blocks_per_pass or block.layer.index == len(self.cache.layers) - 1:
            self.flush()

    def store_finished(self, chunk_idx: int) -> None:
        """Store the held chunk ``chunk_idx - 1`` of every block between updates, in passes."""
        held = sorted((b for b in self.blocks if b.chunk is not None and b._curr_chunk_idx is None
                       and b._prev_chunk_idx == chunk_idx - 1), key=lambda b: b.layer.index)
        for i in range(0, len(held), self.blocks_per_pass):
            self._store(held[i : i + self.blocks_per_pass])
        for b in held:
            b.stored = True

    def flush(self) -> None:
        """Store every waiting block's chunk, compressed in one pass."""
        waiting, self.waiting = self.waiting, []
        self._store(waiting)

    def _store(self, blocks: list) -> None:
        """The chunks ``blocks`` still hold, compressed in one pass and appended."""
        blocks = [b for b in blocks if b.chunk is not None]
        if blocks:
            self.cache.compress_ahead({b.layer.index: b.chunk for b in blocks})
            for b in blocks:
                b._store()


class QKVBlockCache:
    """``BlockKVCache``'s protocol over layer ``index`` of ``owner``; K/V arrive as [B, S, H, D]
    (this rank's tokens under context parallelism: sizes are per rank, as upstream's). ``final``:
    the :class:`FinalPass` that stores its finished chunks with other blocks' (None: each alone)."""

    def __init__(self, owner: KVCache, index: int, *, chunk_size: int, window_size: int, sink_size: int,
                 parallel: ContextParallel | None = None, mesh=None, final: FinalPass | None = None) -> None:
        if sink_size % chunk_size or (sink_size + window_size) % chunk_size:
            raise ConfigError(f"flashdreams: sink_size ({sink_size}) and sink_size + window_size "
                              f"({sink_size + window_size}) must be whole chunks of {chunk_size} tokens")
        self.owner, self.layer, self.parallel = owner, owner.layer(index), parallel
        self.mesh = mesh  # the block's context-parallel mesh when the cache was made (``parallel``'s)
        self.final = final
        # under Ulysses the layer holds every rank's tokens of this rank's heads
        u = parallel.ulysses_world if parallel is not None else 1
        self.chunk_size, self.window_size, self.sink_size = chunk_size * u, window_size * u, sink_size * u
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, H, S, D] being denoised
        self._prev_chunk_idx, self._curr_chunk_idx = -1, None
        # set by the transformer's finalize_kv_cache (see install): the chunk's last write is under
        # way, so the next after_update stores it; ``stored``: the last chunk was stored so
        self.finishing = self.stored = False

    def before_update(self, chunk_idx: int) -> None:
        """A rewrite of the current chunk (same index) or the next chunk: the held chunk joins
        the history (unless it was stored at its last write), which is cut to the window (sink +
        window - chunk tokens before the chunk)."""
        if self._curr_chunk_idx is not None:
            raise CacheError("flashdreams: before_update() twice without after_update()")
        if chunk_idx not in (self._prev_chunk_idx, self._prev_chunk_idx + 1):
            raise CacheError(f"flashdreams: chunk {chunk_idx} after chunk {self._prev_chunk_idx} "
                             f"(expected {self._prev_chunk_idx} or {self._prev_chunk_idx + 1})")
        if chunk_idx == self._prev_chunk_idx and self.stored:
            raise CacheError(f"flashdreams: chunk {chunk_idx} was stored at its last write (the transformer's "
                             "finalize_kv_cache, or another block starting the next chunk); it cannot be "
                             "written again")
        if chunk_idx == self._prev_chunk_idx + 1:
            if self.chunk is not None:
                if self.final is None:
                    self._store()
                else:
                    self.final.store_finished(chunk_idx)
            self.stored = False
            over = self.layer.tokens + self.chunk_size - (self.sink_size + self.window_size)
            if over > 0:
                self.layer.evict(over)
        self._curr_chunk_idx = chunk_idx

    def _store(self) -> None:
        """The held chunk joins the compressed history."""
        self.layer.append(*self.chunk)
        self.chunk = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """The current chunk's K/V [B, chunk_size, H, D] (RoPE applied)."""
        if self._curr_chunk_idx is None:
            raise CacheError("flashdreams: update() before before_update()")
        u = self._ulysses
        if k.shape[1] * u != self.chunk_size or v.shape[1] * u != self.chunk_size:
            raise CacheError(f"flashdreams: expected chunks of {self.chunk_size // u} tokens, got {k.shape[1]}")
        if u > 1:  # every rank's tokens of this rank's heads
            k, v = self.parallel.to_heads(k), self.parallel.to_heads(v)
        self.chunk = (k.transpose(1, 2), v.transpose(1, 2))

    @property
    def _ulysses(self) -> int:
        return self.parallel.ulysses_world if self.parallel is not None else 1

    def after_update(self, chunk_idx: int) -> None:
        """The chunk's update is done; during its last write (:attr:`finishing`) it is stored now,
        or with other blocks' (:attr:`final`) before the pass ends, so no chunk waits in bf16
        between model calls."""
        if chunk_idx != self._curr_chunk_idx:
            raise CacheError(f"flashdreams: after_update({chunk_idx}) for chunk {self._curr_chunk_idx}")
        if self.finishing:
            self.finishing = False
            if self.chunk is not None:
                self.stored = True
                if self.final is None:
                    self._store()
                else:
                    self.final.add(self)
        self._prev_chunk_idx, self._curr_chunk_idx = chunk_idx, None

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Attention of q [B, H, Sq, D] (this rank's queries) to the history and the current chunk
        (of every rank, under context parallelism): [B, H, Sq, D]."""
        if self.chunk is None:
            raise CacheError("flashdreams: attention before the chunk's update()")
        parallel = self.parallel
        if parallel is None:
            return self.layer.attend(q, extra=self.chunk)
        if parallel.ring:
            return attend_parts(self.owner.config, q, [self.layer, self.chunk], parallel)
        out = self.layer.attend(parallel.to_heads(q.transpose(1, 2)).transpose(1, 2), extra=self.chunk)
        return parallel.to_tokens(out.transpose(1, 2)).transpose(1, 2)

    def cached_k(self) -> torch.Tensor:
        """``BlockKVCache.cached_k``: history and chunk as [B, S, H, D] (decompressed: a copy; this
        rank's tokens of every head under context parallelism, as upstream's buffer)."""
        return self._cached(0)

    def cached_v(self) -> torch.Tensor:
        return self._cached(1)

    def _cached(self, i: int) -> torch.Tensor:
        if self.chunk is None:
            raise CacheError("flashdreams: the cache is read before the chunk's update()")
        parts = [self.layer.read()[i]] if self.layer.layout is not None else []
        x = torch.cat([*parts, self.chunk[i]], 2).transpose(1, 2)  # [B, S, H or H / u, D]
        u = self._ulysses
        if u == 1:
            return x
        # chunk by chunk, every rank's tokens of this rank's heads: rank-major for the all-to-all back
        b, s, h, d = x.shape
        per_rank = x.reshape(b, s // self.chunk_size, u, self.chunk_size // u, h, d).transpose(1, 2)
        return self.parallel.to_tokens(per_rank.reshape(b, s, h, d))

    def reset(self) -> None:
        self.layer.reset()
        self.chunk, self._prev_chunk_idx, self._curr_chunk_idx = None, -1, None
        self.finishing = self.stored = False


class FlashDreamsHandle(AdapterHandle):
    """:class:`AdapterHandle` of a flashdreams ``WanDiTNetwork``. Every
    ``network.initialize_cache`` (it initializes block 0 first) gets a :class:`KVCache` of its
    own, so caches built side by side (flashdreams builds one per CFG branch) stay apart; the
    handle counts those still in use (``cache``: the newest). Spans are one chunk unless
    ``span_chunks`` or ``span_tokens`` says otherwise: each chunk is compressed at its last write
    (or when the next one starts) and no chunk waits in bf16 for a span to fill (the Self-Forcing
    model of streamdiffusionv2, at the same sizes: 4.61x less KV than upstream with one-chunk
    spans, 2.80x with 8-chunk ones; docs/adapters/streamdiffusionv2.md). Finished chunks are
    compressed ``blocks_per_pass`` blocks at a time (:class:`FinalPass`)."""

    def __init__(self, network, policy: Policy | str, cache_options: dict, blocks_per_pass: int = 8) -> None:
        super().__init__("flashdreams", policy, cache_options, fixed=("num_layers", "max_spans", "sink_chunks"))
        check_int("flashdreams", "blocks_per_pass", blocks_per_pass, 1)
        self.network, self.blocks_per_pass = network, blocks_per_pass
        self._live: weakref.WeakSet[QKVBlockCache] = weakref.WeakSet()
        self.final: FinalPass | None = None  # the newest cache's

    def caches(self) -> list[KVCache]:
        return list({id(c.owner): c.owner for c in self._live}.values())

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [c.chunk for c in self._live if c.chunk is not None]

    def reset(self) -> None:
        for block in list(self._live):
            block.reset()

    def initialize(self, index: int, chunk_size: int, window_size: int, sink_size: int) -> QKVBlockCache:
        """Block ``index``'s cache of a new ``initialize_cache`` (a new video)."""
        self.check_installed()
        if index == 0 or self.cache is None:
            spans = {} if {"span_chunks", "span_tokens"} & set(self.cache_options) else {"span_chunks": 1}
            self.cache = KVCache(self.policy, num_layers=len(self.network.blocks), sink_chunks=sink_size // chunk_size,
                                 **spans, **self.cache_options)
            self.final = FinalPass(self.cache, self.blocks_per_pass)
        attn = self.network.blocks[index].self_attn
        block = QKVBlockCache(self.cache, index, chunk_size=chunk_size, window_size=window_size, sink_size=sink_size,
                              parallel=parallel_of(attn), mesh=attn.attn_op.device_mesh, final=self.final)
        self._live.add(block)
        self.final.blocks.add(block)
        return block


def _apply_kv(attn):
    """``MultiHeadAttention.apply_kv`` with the attention over a :class:`QKVBlockCache`."""

    def apply_kv(self, x, kv_cache, rope_freqs_q=None, rope_freqs_k=None):
        from flashdreams.core.attention.rope import apply_rope_freqs

        if not isinstance(kv_cache, QKVBlockCache):
            raise CacheError(f"flashdreams: the cache must come from the installed initialize_cache, got "
                             f"{type(kv_cache).__name__}")
        if self.attn_op.device_mesh is not kv_cache.mesh:  # its tokens are split another way than the cache's
            raise CacheError("flashdreams: the context-parallel group changed after initialize_cache "
                             "(set_context_parallel_group comes first, as upstream requires); initialize the cache again")
        batch_shape = x.shape[:-2]
        length, n, d = x.shape[-2], self.n_heads, self.head_dim
        q = self.norm_q(self.q(x)).reshape(math.prod(batch_shape), length, n, d)
        if rope_freqs_q is not None:
            q = apply_rope_freqs(q, rope_freqs_q, interleaved=True)
        out = kv_cache.attend(q.transpose(1, 2)).transpose(1, 2)
        return self.o(out.reshape(batch_shape + (length, n * d)))

    return types.MethodType(apply_kv, attn)


def install(target, policy: Policy | str = "qvg", *, blocks_per_pass: int = 8, **cache_options) -> FlashDreamsHandle:
    """Run ``target`` (a flashdreams ``WanDiTNetwork``, or an object with ``.network``) on a
    compressed cache. Given the transformer (``Wan21Transformer``: ``.network`` and
    ``finalize_kv_cache``), each chunk is stored at its last write, the pass ``finalize_kv_cache``
    runs after its denoising; given the network alone, when the next chunk starts; either way
    ``blocks_per_pass`` blocks' chunks compressed together. ``policy``: a
    :class:`Policy` or preset/spec; ``cache_options``: the :class:`~qkv.KVCache` options except
    ``sink_chunks`` (from ``sink_size``), ``max_spans`` (the window) and ``num_layers`` (spans are
    one chunk unless ``span_chunks`` or ``span_tokens`` is given). Returns the handle
    (``memory()``, ``remove()``)."""
    network = getattr(target, "network", target)
    if not hasattr(network, "blocks") or not all(hasattr(b, "self_attn") for b in network.blocks):
        raise ConfigError(f"flashdreams: expected a WanDiTNetwork, got {type(network).__name__}")
    if getattr(getattr(target, "config", None), "use_cuda_graph", False):
        raise ConfigError("flashdreams: the transformer replays its network from a CUDA graph once the window is "
                          "full (use_cuda_graph=True), which would freeze the cache's work into the graph; build it "
                          "with use_cuda_graph=False")
    handle = FlashDreamsHandle(network, policy, cache_options, blocks_per_pass)
    for index, block in enumerate(network.blocks):
        attn = block.self_attn
        if not attn.apply_rope_before_kvcache:
            raise ConfigError("flashdreams: keys roped relative to the cache (apply_rope_before_kvcache=False) "
                              "need the whole history decompressed at every read; use apply_rope_before_kvcache=True")

        def initialize_cache(self, batch_size, chunk_size, window_size, sink_size, device, dtype, _index=index):
            return handle.initialize(_index, chunk_size, window_size, sink_size)

        handle.patches.set(attn, "initialize_cache", types.MethodType(initialize_cache, attn))
        handle.patches.set(attn, "apply_kv", _apply_kv(attn))
    if target is not network and callable(getattr(target, "finalize_kv_cache", None)):
        handle.patches.set(target, "finalize_kv_cache", _finalize_kv_cache(target))
    return handle


def _finalize_kv_cache(transformer):
    """``Wan21Transformer.finalize_kv_cache`` (``DiffusionModel.finalize`` runs it after a chunk's
    denoising, then ``cache.finalize``, whose ``after_update`` ends the chunk's update): the
    chunk's last write, so each self-attention cache of ``cache``'s branches stores it then."""
    finalize = transformer.finalize_kv_cache

    def finalize_kv_cache(self, noisy_latent, timestep, cache, input=None):
        branches = (getattr(cache, "network_cache", None), getattr(cache, "network_cache_uncond", None))
        blocks = [b.self_attn for branch in branches if branch is not None for b in branch.block_caches
                  if isinstance(b.self_attn, QKVBlockCache)]
        for block in blocks:
            block.finishing = True
        try:
            return finalize(noisy_latent, timestep, cache, input)
        except BaseException:
            for block in blocks:
                block.finishing = False
            raise

    return types.MethodType(finalize_kv_cache, transformer)
