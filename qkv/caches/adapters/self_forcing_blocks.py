"""A drop-in for the Self-Forcing code's per-block KV cache dicts, backed by a :class:`KVCache`.

Self-Forcing (guandeh17/Self-Forcing) allocates, per transformer block,
``{"k": zeros[B, L, H, D], "v": zeros[B, L, H, D], "global_end_index": tensor([0]),
"local_end_index": tensor([0])}``, and its attention (``CausalWanSelfAttention``) writes and reads
that buffer by slice:

- ``cache["k"][:, start:end] = k`` writes the current chunk (repeatedly: every denoising step
  rewrites the same slots, the final clean pass last);
- when the buffer is full (a ``local_attn_size`` window of frames), ``cache["k"][:, sink:sink + n] =
  cache["k"][:, sink + e:sink + e + n].clone()`` shifts the history left by ``e`` tokens after the
  ``sink_size`` frames of the sink, then the chunk is written;
- ``cache["k"][:, lo:end]`` is read for attention; ``global_end_index`` / ``local_end_index`` are
  read with ``.item()`` and updated with ``.fill_()`` (or replaced by new tensors to restart).

:func:`self_forcing_kv_cache` returns one :class:`SelfForcingBlockCache` per block that supports
exactly these operations, so the pipeline takes it in place of its list of dicts with no change to
its attention code. A written chunk stays pending (full precision) while it is being rewritten;
the first write of the next chunk appends it to the :class:`LayerCache` (once), which compresses
spans as they complete. A shift is recognised (its values are checked against the cache content)
and becomes :meth:`LayerCache.evict`; its ``sink`` must equal the cache's sink (``sink_tokens``:
the sink's frames in tokens). A write to a slice that is none of these raises :class:`CacheError`.

Gradients: the pending chunk is kept as written, so a read of its slots is differentiable (the
exit step of Self-Forcing's training rollout backpropagates through the chunk being denoised);
the history is stored detached, so committing a pending chunk that requires grad raises
:class:`GradientError` instead of dropping its gradient (the training rollout rewrites it under
``torch.no_grad()`` first, with its clean context pass).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, MutableMapping

import torch
import torch.nn.functional as F
from einops import rearrange

from qkv.caches.adapters.handle import HostValue, pending_memory
from qkv.caches.cache_config import CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError, GradientError, ShapeError

__all__ = ["SelfForcingBlockCache", "SlotView", "cache_options", "self_forcing_kv_cache"]


def _token_slice(key: object, capacity: int) -> tuple[int, int]:
    """``[:, a:b]`` -> (a, b); anything else raises."""
    if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)):
        raise CacheError(f"only [:, start:end] slices of the token axis are supported, got {key!r}")
    start, stop, step = key[1].indices(capacity)
    if step != 1:
        raise CacheError(f"token slices must have step 1, got {key[1]!r}")
    return start, max(start, stop)


def _held(value: torch.Tensor) -> torch.Tensor:
    """A written chunk as held while pending: a copy that keeps its autograd history when grad is
    enabled (reads of its slots stay differentiable), a detached copy otherwise."""
    return value.clone() if torch.is_grad_enabled() else value.detach().clone()


@dataclasses.dataclass(eq=False)
class BlockGroup:
    """The drop-ins of one cache list, over one :class:`KVCache`: their finished chunks are
    compressed together (:meth:`KVCache.compress_ahead`). ``writes_per_chunk``: the attention
    steps a chunk gets, when the pipeline running says (None: unknown); ``waiting``: the blocks
    whose chunk had its last write, stored ``blocks_per_pass`` at a time."""

    cache: KVCache
    blocks: list
    blocks_per_pass: int = 8
    writes_per_chunk: int | None = None
    waiting: list = dataclasses.field(default_factory=list)

    def flush(self) -> None:
        """Store the waiting blocks' final chunks, compressed in one pass."""
        waiting, self.waiting = self.waiting, []
        self.cache.compress_ahead({b.layer.index: b._finished() for b in waiting})
        for b in waiting:
            b._final_at = b._start, b._writes
            b._commit()


class SlotView:
    """What ``cache["k"]`` / ``cache["v"]`` returns: a [B, L, H, D] buffer read and written by slice."""

    def __init__(self, owner: "SelfForcingBlockCache", name: str) -> None:
        self.owner, self.name = owner, name

    @property
    def shape(self) -> torch.Size:
        return self.owner.buffer_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.owner.dtype

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key: object) -> torch.Tensor:
        a, b = _token_slice(key, self.shape[1])
        return self.owner.read_slots(self.name, a, b)

    def __setitem__(self, key: object, value: torch.Tensor) -> None:
        a, b = _token_slice(key, self.shape[1])
        self.owner.write_slots(self.name, a, b, value)


class SelfForcingBlockCache(MutableMapping):
    """One block's cache dict (keys ``k``, ``v``, ``global_end_index``, ``local_end_index``).

    ``layer``: the :class:`LayerCache` that stores this block; ``capacity``: the buffer length L
    the pipeline sees (``shape[1]``; it decides eviction from it); K/V slots are [B, L, H, D].
    """

    def __init__(self, layer: LayerCache, *, batch_size: int, capacity: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device) -> None:
        self.layer = layer
        self.buffer_shape = torch.Size((batch_size, capacity, heads, head_dim))
        self.dtype, self.device = dtype, torch.device(device)
        self._views = {"k": SlotView(self, "k"), "v": SlotView(self, "v")}
        self._indices = {
            "global_end_index": torch.tensor([0], dtype=torch.long, device=self.device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=self.device),
        }
        self._pending: dict[str, torch.Tensor] = {}  # name -> [B, n, H, D], the chunk being written
        self._pending_at = (0, 0)
        self._shift: tuple[int, int, int] | None = None  # (a, b, e) of a shift whose K half is done
        self._known = {name: HostValue() for name in self._indices}  # the end indices' last values
        # made by self_forcing_kv_cache: the blocks' finished chunks are compressed in one pass
        self.group: BlockGroup | None = None
        self._writes = 0  # attention steps that wrote the chunk being written (at token _start)
        self._start: int | None = None
        self._short_of: int | None = None  # the writes it needs, once its K/V were dropped after an earlier one
        self._final_at: tuple[int, int] | None = None  # (first token, writes) of the chunk stored at its last

    # -- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: str):
        if key in self._views:
            return self._views[key]
        return self._indices[key]

    def __setitem__(self, key: str, value) -> None:
        if key in self._views:
            raise CacheError(f"cache[{key!r}] is a compressed store; write slices of it instead of replacing it")
        if key not in self._indices:
            raise KeyError(key)
        self._indices[key] = value

    def __delitem__(self, key: str) -> None:
        raise CacheError("the entries of a Self-Forcing cache dict cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(("k", "v", "global_end_index", "local_end_index"))

    def __len__(self) -> int:
        return 4

    # -- state ---------------------------------------------------------------------------------
    @property
    def filled(self) -> int:
        """Slots holding data: the stored tokens, then the pending chunk."""
        return self.layer.tokens + (self._pending_at[1] - self._pending_at[0])

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The chunk being written, held outside the layer: [(k, v)] [B, H, n, D] (K for V where
        only K is written yet), or []."""
        if not self._pending:
            return []
        k = self._pending.get("k", self._pending.get("v"))
        v = self._pending.get("v", k)
        return [(rearrange(k, "b s h d -> b h s d"), rearrange(v, "b s h d -> b h s d"))]

    def memory(self) -> CacheMemory:
        """Exact bytes held for this block: the layer's and the pending chunk's."""
        return self.layer.memory() + pending_memory(self.pending())

    def _commit(self) -> None:
        """Append the pending chunk to the layer (once both K and V were written). Its values are
        checked here (with ``validate``), once, not at every write of the denoising steps (each
        check is a read-back from the GPU): a chunk holding NaN/Inf raises
        :class:`~qkv.errors.NonFiniteError` and stays pending, nothing stored."""
        if self._short_of is not None:
            raise CacheError(
                f"slots {self._pending_at} hold a chunk written {self._writes} times, not the {self._short_of} "
                "its pipeline makes, whose K/V were dropped after each write but the last"
            )
        if not self._pending:
            return
        if set(self._pending) != {"k", "v"}:
            raise CacheError(f"slots {self._pending_at} were written for {sorted(self._pending)} only, not k and v")
        if any(t.requires_grad for t in self._pending.values()):
            raise GradientError(
                f"slots {self._pending_at} hold a chunk that requires grad, and the next chunk would store it in the "
                "history, which keeps no gradient: rewrite it under torch.no_grad() first (as Self-Forcing's clean "
                "context pass does) or detach it"
            )
        k, v = self._finished()
        self._check_span_fits(k.shape[2])
        with torch.no_grad():
            if self.group is not None and self.layer.ahead_request(k, v) is not None:
                self._compress_finished()
            self.layer.append(k, v)
        self._pending, self._pending_at = {}, (self.layer.tokens, self.layer.tokens)

    def _check_span_fits(self, chunk: int) -> None:
        """Raise :class:`ConfigError` if spans of chunks of ``chunk`` tokens (with what the
        policy keeps in full precision after a span) cannot complete within the buffer after the
        sink: nothing would ever be compressed, and the tail would hold the window in full
        precision. Spans of a residual window (KIVI) compress whole groups as they leave it."""
        cfg = self.layer.config
        if cfg.residual_group is not None:
            return
        window = self.buffer_shape[1] - cfg.sink_tokens
        span = cfg.span_tokens if cfg.span_chunks is None else cfg.span_chunks * chunk
        keep = max(cfg.fp_window, cfg.recent_chunks * chunk)
        if span + keep > window:
            raise ConfigError(
                f"layer {self.layer.index}: a span of {span} tokens{f' (+ {keep} kept in full precision)' if keep else ''} "
                f"never completes in the {window} slots after the sink, so nothing would be compressed; use spans "
                f"of at most {max(window - keep, 0)} tokens (span_chunks=1 fits any buffer of two chunks)"
            )

    def _finished(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pending chunk's k, v in the layer's layout [B, H, n, D] (views)."""
        return tuple(rearrange(self._pending[n], "b s h d -> b h s d") for n in ("k", "v"))

    def _compress_finished(self) -> None:
        """Compress the chunk of every block of the list that holds a finished chunk at the slots
        of this block's, in one pass (:meth:`KVCache.compress_ahead`): upstream moves all blocks
        on together, so the first block to start the next chunk finds every block's chunk final;
        each block's commit then stores its own, bit for bit what compressing it alone gives."""
        chunks = {
            b.layer.index: b._finished()
            for b in self.group.blocks
            if b._pending_at == self._pending_at and set(b._pending) == {"k", "v"}
            and not any(t.requires_grad for t in b._pending.values())
        }
        self.group.cache.compress_ahead(chunks)

    def _content(self, name: str) -> torch.Tensor:
        """Everything held for ``name``: [B, filled, H, D]."""
        if self._short_of is not None:
            raise CacheError(f"{name} slots {self._pending_at} are read after their K/V were dropped (a write that "
                             "was not the chunk's last; see writes_per_chunk)")
        parts = []
        if self.layer.layout is not None and self.layer.tokens:
            k, v = self.layer.read()
            parts.append(rearrange(k if name == "k" else v, "b h s d -> b s h d"))
        if name in self._pending:
            parts.append(self._pending[name])
        elif self._pending:
            raise CacheError(f"{name} slots {self._pending_at} are read before they were written")
        if not parts:
            b, _, h, d = self.buffer_shape
            return torch.empty(b, 0, h, d, dtype=self.dtype, device=self.device)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def read_slots(self, name: str, a: int, b: int) -> torch.Tensor:
        """``cache[name][:, a:b]``: [B, b - a, H, D] (a copy)."""
        if self._shift is not None and name == "k":
            raise CacheError("k is read between the k and the v half of a shift")
        if b > self.filled:
            raise CacheError(f"slots {a}:{b} read, only {self.filled} hold data")
        return self._content(name)[:, a:b].clone()

    def write_slots(self, name: str, a: int, b: int, value: torch.Tensor) -> None:
        """``cache[name][:, a:b] = value`` (value [B, b - a, H, D])."""
        want = (self.buffer_shape[0], b - a, *self.buffer_shape[2:])
        if not torch.is_tensor(value) or tuple(value.shape) != want:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ShapeError(f"cache[{name!r}][:, {a}:{b}] needs a tensor of shape {want}, got {got}")
        value = value.to(self.dtype)  # its values are checked when the chunk is stored (:meth:`_commit`)
        if self.layer.seen and self.index("global_end_index") == 0 and a == 0:
            self.restart()  # the pipeline reset its indices: a new video starts
        p0, p1 = self._pending_at
        if self._shift is not None or (b < self.filled and (a, b) != (p0, p1)):
            self._write_shift(name, a, b, value)
        elif (a, b) == (p0, p1) and p1 > p0:
            self._pending[name] = _held(value)  # a rewrite of the pending chunk
            self._short_of = None
        elif a == self.filled and self._pending_at[0] != a:
            self._commit()
            self._pending, self._pending_at = {name: _held(value)}, (a, b)
        elif a == p0 and p1 == p0:
            self._pending, self._pending_at = {name: _held(value)}, (a, b)
        else:
            raise CacheError(
                f"cache[{name!r}][:, {a}:{b}] = ... is neither the next chunk (at {self.filled}), a rewrite of "
                f"the pending chunk {self._pending_at}, nor a shift of the history after the sink"
            )

    def _write_shift(self, name: str, a: int, b: int, value: torch.Tensor) -> None:
        """The history after slot ``a`` moves left by ``e = filled - b`` slots."""
        e = self.filled - b
        if self._shift is None:
            self._check_sink(a)
            if name != "k":
                raise CacheError("a shift must move k before v (as Self-Forcing does)")
        elif self._shift != (a, b, e) or name != "v":
            raise CacheError(f"the v half of a shift must match its k half {self._shift}, got {(a, b, e)} for {name}")
        if not torch.equal(value.detach(), self._content(name)[:, a + e : b + e].detach()):
            raise CacheError(f"cache[{name!r}][:, {a}:{b}] is written with data that is not the history shifted by {e}")
        if name == "k":
            self._shift = (a, b, e)
            return
        self._shift = None
        self._evict_after(a, e)

    # -- the attention step ----------------------------------------------------------------------
    def index(self, name: str) -> int:
        """``int(cache[name].item())``, read from the device only when the index tensor changed
        since it was last read or written here (:class:`HostValue`)."""
        return self._known[name].read(self._indices[name], lambda t: int(t.item()))

    def set_index(self, name: str, value: int) -> None:
        """``cache[name].fill_(value)``, remembered (no read-back needed for the next step)."""
        tensor = self._indices[name]
        tensor.fill_(value)
        self._known[name].wrote(tensor, value)

    def attention_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, current_start: int, *,
                       local_attn_size: int, sink_tokens: int, max_attention_size: int) -> torch.Tensor:
        """The cache branch of Self-Forcing's ``CausalWanSelfAttention.forward`` on this drop-in,
        attending to the compressed spans: q, k (roped) and v [B, S, H, D] of a chunk starting at
        token ``current_start``; returns the attention [B, S, H, D] in q's dtype. Upstream's index
        arithmetic, its shift of the history after the sink when a window is full (here
        :meth:`LayerCache.evict`, no copy), the chunk's slot writes and the end indices, as
        upstream; its read of slots ``max(0, end - max_attention_size):end`` and attention over
        them become :meth:`attend`."""
        n = q.shape[1]
        current_end = current_start + n
        global_end, local_end = self.index("global_end_index"), self.index("local_end_index")
        capacity = self.buffer_shape[1]
        if local_attn_size != -1 and current_end > global_end and n + local_end > capacity:
            evicted = n + local_end - capacity
            self._evict_after(sink_tokens, evicted)
            local_end = local_end + current_end - global_end - evicted
        else:
            local_end = local_end + current_end - global_end
        again = current_end == global_end  # the chunk of the last step again (not a new one, nor a new video)
        if again and self._final_at is not None and current_start == self._final_at[0]:
            raise CacheError(f"the chunk at token {current_start} is written again after the {self._final_at[1]} "
                             "writes its pipeline makes stored it")
        rewrite = again and current_start == self._start and (self._pending or self._short_of is not None)
        self.write_slots("k", local_end - n, local_end, k)
        self.write_slots("v", local_end - n, local_end, v)
        self._writes, self._start = (self._writes + 1 if rewrite else 1), current_start
        out = self.attend(q, max(0, local_end - max_attention_size), local_end)
        self.set_index("global_end_index", current_end)
        self.set_index("local_end_index", local_end)
        self._settle()
        return out

    def _settle(self) -> None:
        """After an attention step: when the chunks' writes are known (the group's
        ``writes_per_chunk``), a chunk short of them drops its K/V (the next step rewrites them
        before anything reads them), and one at its last write waits to be stored with the
        group's other final chunks, ``blocks_per_pass`` blocks per compression pass, or at the
        last block. So between steps no block holds its chunk in full precision. A chunk that
        needs gradients (the training rollout) is always held."""
        group = self.group
        total = None if group is None else group.writes_per_chunk
        if total is None or any(t.requires_grad for t in self._pending.values()):
            return
        if self._writes < total:
            self._pending, self._short_of = {}, total
            return
        group.waiting.append(self)
        if len(group.waiting) >= group.blocks_per_pass or self is group.blocks[-1]:
            group.flush()

    def _check_sink(self, sink: int) -> None:
        """A shift after slot ``sink`` keeps exactly the cache's sink."""
        held = sum(c.tokens for c in self.layer.sink)
        if sink != held:
            raise CacheError(
                f"a shift after slot {sink} needs the cache's sink to hold exactly {sink} tokens (it holds {held}): "
                "set KVCache(sink_tokens=...) to the pipeline's sink frames times the tokens per frame"
            )

    def _evict_after(self, sink: int, tokens: int) -> None:
        """Upstream's left shift by ``tokens`` slots after the first ``sink`` slots: the chunk being
        written is stored first, then the oldest ``tokens`` after the sink leave the layer."""
        self._check_sink(sink)
        self._commit()
        self.layer.evict(tokens)
        self._pending_at = (self.layer.tokens, self.layer.tokens)

    def attend(self, q: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Attention of q [B, S, H, D] to slots ``a:b``: [B, S, H, D] in q's dtype. Over every
        slot held (upstream's read when its buffer is no longer than its attention window, as
        its pipelines allocate it), the layer's spans attend compressed with the chunk being
        written (:meth:`LayerCache.attend`); a read of fewer slots, or one that needs gradients
        (the training rollout's exit step), reads the slots (:meth:`read_slots`) for
        ``scaled_dot_product_attention``."""
        pending = self.pending()
        grad = torch.is_grad_enabled() and (q.requires_grad or any(t.requires_grad for t in self._pending.values()))
        if a == 0 and b == self.filled and pending and not grad and self.layer.config.attention != "read":
            out = self.layer.attend(rearrange(q, "b s h d -> b h s d"), extra=pending[0])
            return rearrange(out, "b h s d -> b s h d")
        keys, values = (rearrange(self.read_slots(name, a, b), "b s h d -> b h s d").to(q.dtype) for name in "kv")
        return rearrange(F.scaled_dot_product_attention(rearrange(q, "b s h d -> b h s d"), keys, values),
                         "b h s d -> b s h d")

    def restart(self) -> None:
        """Forget the video: the layer and the chunk being written (the pipeline restarts)."""
        self.layer.reset()
        self._pending, self._pending_at, self._shift = {}, (0, 0), None
        self._writes, self._start, self._short_of, self._final_at = 0, None, None, None
        if self.group is not None and self in self.group.waiting:
            self.group.waiting.remove(self)


def self_forcing_kv_cache(
    cache: KVCache,
    *,
    num_blocks: int,
    batch_size: int,
    capacity: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
    blocks_per_pass: int = 8,
) -> list[SelfForcingBlockCache]:
    """Per-block cache dicts standing in for one of Self-Forcing's cache lists (block i ->
    ``cache.layer(i)``), K/V slots [B, capacity, heads, head_dim]. ``cache`` should be made with
    :func:`cache_options` (its sink and, with a window, its spans);
    :func:`qkv.caches.adapters.self_forcing.install` does all of it from the pipeline and its model. ``blocks_per_pass``: the blocks whose final chunks are
    compressed in one pass when the pipeline's writes per chunk are known (``install`` sets them)."""
    blocks = [
        SelfForcingBlockCache(cache.layer(i), batch_size=batch_size, capacity=capacity, heads=heads,
                              head_dim=head_dim, dtype=dtype, device=device)
        for i in range(num_blocks)
    ]
    group = BlockGroup(cache, blocks, blocks_per_pass)
    for block in blocks:
        block.group = group
        block.layer.bound_to(max(capacity - cache.config.sink_tokens, 1))  # upstream's buffer bounds what it holds
    return blocks


def cache_options(*, frame_tokens: int, chunk_frames: int, sink_size: int = 0) -> dict:
    """The :class:`KVCache` options Self-Forcing's attention settings fix: ``sink_tokens`` (its
    ``sink_size`` frames in tokens) and spans of one chunk (``span_tokens``: ``chunk_frames``
    frames). With a rolling window (``local_attn_size`` frames) the window evicts one chunk's
    tokens per chunk, right after the sink, so spans cut there leave with whole evictions (no dead
    tokens) and every chunk completes one span (no tail buffer ahead of the window); without one,
    upstream's buffer holds 32,760 tokens (7 chunks of 3 frames), which spans of several chunks
    would never fill."""
    return {"sink_tokens": sink_size * frame_tokens, "span_tokens": chunk_frames * frame_tokens}
