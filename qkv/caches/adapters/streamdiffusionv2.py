"""StreamDiffusionV2's causal Wan (the Self-Forcing / CausVid ``CausalWanModel``) on a qkv cache.

``streamdiffusionv2`` (PyPI; ``models/wan/causal_model.py``) runs Wan2.1 one chunk of latent frames
per forward; every block's ``CausalWanSelfAttention`` writes the chunk's roped K and its V into a
bf16 buffer ``kv_cache[i]["k"/"v"]`` [B, L, H, D] (each denoising step rewrites the chunk's slots,
the last step's K/V stay) and attends its queries to every filled slot.

:func:`install` replaces only that attention over the cache, on each block's ``self_attn``
instance: q/k/v, the RMS norms, ``causal_rope_apply`` (keys cached after RoPE, as upstream) and the
output projection are the module's own; the chunk's roped K/V are kept in full precision while
the chunk is denoised (a rewrite replaces them), appended to the :class:`~qkv.KVCache` once when
the next chunk starts (spans are compressed as they complete), and attention is
``cache.attend(block, q, extra=(k, v))`` over the compressed spans plus the chunk: the bf16
history is never rebuilt. The buffer capacity L is read from the ``kv_cache`` dicts the caller
passes (``kv_cache[i]["k"].shape[1]``); on a ``CausalStreamInferencePipeline``, ``install`` also
makes ``_initialize_kv_cache`` allocate those buffers on the meta device (shape only, no memory).

    handle = qkv.adapters.streamdiffusionv2.install(pipeline, "qvg")   # or the CausalWanModel
    ...                                   # pipeline.prepare / inference_wo_batch, unchanged
    handle.memory(); handle.remove()

Several GPUs: :class:`KVCacheManager` stands in for upstream's ``streamv2v.communication.KVCacheManager``
(the same calls): when blocks change owner, each moved block's state (:meth:`StreamDiffusionV2Handle.pack_block`:
its cache layer as compressed bytes and the chunk being denoised) is broadcast from its old owner.

Upstream's local window is reproduced: the adapter runs its slot bookkeeping (end indices, ring
queue ``evict_idx``, step counter) and holds exactly the slots upstream attends to; the slots its
ring never overwrites (the first chunk, the chunks inside ``sink_size`` frames) are the cache's
sink, a ring write evicts the oldest chunk after it. Not reproduced, with a typed error: rows of
one batch at different positions (the stream-batch ``inference_stream``), the adaptive sink
refresh (``adapt_sink_thr > -1``), reads of slots upstream never wrote (its zeros), and ring
writes over the sink or over part of a chunk (chunks of different sizes).
"""

from __future__ import annotations

import dataclasses
import math
import types

import torch
import torch.distributed as dist

from qkv.caches.adapters.handle import AdapterHandle, HostValue
from qkv.caches.adapters.self_forcing import cache_options
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.caches.transfer import PackedReader, broadcast_packed, pack_layer, tensor_entry, unpack_layer
from qkv.component import check_int
from qkv.compressed import PackedBytes
from qkv.errors import CacheError, ConfigError, CorruptDataError
from qkv.io import field, load_device

__all__ = ["KVCacheManager", "StreamDiffusionV2Handle", "install", "meta_kv_cache"]


def _upstream():
    from models.wan import causal_model  # streamdiffusionv2's module (imported on first use only)

    return causal_model


def _model_of(target):
    """(model, pipeline or None) for a ``CausalWanModel`` or a pipeline holding one."""
    if hasattr(target, "blocks") and all(hasattr(b, "self_attn") for b in target.blocks):
        return target, None
    model = getattr(getattr(target, "generator", None), "model", None)
    if model is not None and hasattr(model, "blocks"):
        return model, target
    raise ConfigError(
        f"streamdiffusionv2: expected a CausalWanModel or a pipeline with .generator.model, got {type(target).__name__}"
    )


def _starts(current_start) -> int:
    """The chunk's first token; every row must be at the same position."""
    if torch.is_tensor(current_start):
        values = sorted({int(s) for s in current_start.reshape(-1).tolist()})
    else:
        values = [int(current_start)]
    if len(values) != 1:
        raise CacheError(
            f"streamdiffusionv2: batch rows at different positions {values} (stream batching) are not supported; "
            "run rows at one position (inference_wo_batch / prepare(batch_denoise=False))"
        )
    return values[0]


@dataclasses.dataclass
class Chunk:
    """A block's latest chunk: its first slot, tokens, the K/V [B, H, n, D] of its last write
    while not appended to the layer (None once dropped or ``stored``: see
    :meth:`StreamDiffusionV2Handle.settle`) and how many times it was written."""

    slot: int
    tokens: int
    k: torch.Tensor | None
    v: torch.Tensor | None
    writes: int = 1
    stored: bool = False


class StreamDiffusionV2Handle(AdapterHandle):
    """:class:`AdapterHandle` of a ``CausalWanModel``; per block, the chunk being denoised, the
    buffer slots of every chunk the cache holds, and upstream's slot bookkeeping (its end indices,
    ring queue and step counter), so that the cache holds exactly the slots upstream attends to."""

    def __init__(self, model, policy: Policy | str, cache_options: dict, blocks_per_pass: int = 8) -> None:
        super().__init__("streamdiffusionv2", policy, cache_options,
                         fixed=("num_layers", "max_spans", "sink_chunks", "sink_tokens"))
        check_int("streamdiffusionv2", "blocks_per_pass", blocks_per_pass, 1)
        self.model = model
        self.num_blocks = len(model.blocks)
        self.blocks_per_pass = blocks_per_pass
        self.chunk: list[Chunk | None] = [None] * self.num_blocks
        self.waiting: list[int] = []  # blocks whose chunk had its last write, to be stored in one pass
        # per block: the slots (start, end) of the chunks the cache holds after its sink, oldest first
        self.settled: list[list[tuple[int, int]]] = [[] for _ in range(self.num_blocks)]
        # per block: upstream's global/local end index, step counter and ring queue of slot ends
        self.ring: list[dict | None] = [None] * self.num_blocks
        self.derived: dict = {}  # the cache options the first forward fixed (sink, spans)
        self.start = HostValue()  # the chunk's position, read once per ``current_start`` tensor

    def start_of(self, current_start) -> int:
        """:func:`_starts` of ``current_start``, read from the GPU once per tensor (upstream passes one
        tensor to every block of a forward; see :class:`HostValue`)."""
        return self.start.read(current_start, _starts) if torch.is_tensor(current_start) else _starts(current_start)

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(c.k, c.v) for c in self.chunk if c is not None and c.k is not None]

    def reset(self) -> None:
        super().reset()
        self.chunk = [None] * self.num_blocks
        self.waiting = []
        self.settled = [[] for _ in range(self.num_blocks)]
        self.ring = [None] * self.num_blocks

    def configure(self, attn, n: int, capacity: int, frame_tokens: int) -> KVCache:
        """The cache, built on the first forward: with a window of fewer than two default spans
        after its sink, the sink holds the slots upstream's ring never overwrites (the first chunk
        and the chunks inside ``sink_size`` frames) and spans are one chunk (:func:`cache_options`);
        with a longer buffer (global attention: sized above the rollout) the first chunk is
        compressed like the others unless ``sink_size`` asks for a sink, and a ring that starts
        anyway raises :class:`CacheError` at its first write. Spans are one chunk in both unless
        ``span_chunks`` or ``span_tokens`` was passed: the chunk is compressed as the next one
        starts, every block's in one pass (:meth:`KVCache.compress_ahead`), and nothing waits in
        bf16 for a span to fill (at Wan2.1-1.3B sizes, 32 chunks: 4.61x less KV than upstream and
        as fast, against 2.80x for 8-chunk spans; docs/adapters/streamdiffusionv2.md)."""
        if self.cache is None:
            sink = attn.sink_size * frame_tokens
            kept = max(1, sink // n) * n if _windowed(capacity, sink, n) or sink else 0
            derived = cache_options(frame_tokens=n, chunk_frames=1, sink_size=kept // n)
            if {"span_chunks", "span_tokens"} & set(self.cache_options):
                derived.pop("span_tokens", None)
            self.derived = derived
        return self.build_cache(self.num_blocks, **self.derived)

    def place(self, index: int, attn, kv_cache: dict, start: int, n: int, frame_tokens: int) -> tuple[int, int]:
        """Upstream's slot bookkeeping for one call of block ``index`` (``CausalWanSelfAttention.forward``,
        every row at ``start``, ``n`` tokens): returns (first slot written, slots read), updated
        as upstream updates its end indices, ring queue (``evict_idx``) and step counter."""
        capacity, batch = kv_cache["k"].shape[1], kv_cache["k"].shape[0]
        sink = attn.sink_size * frame_tokens
        if sink > 0 and attn.adapt_sink_thr > -1 and n <= frame_tokens:
            raise ConfigError(
                f"streamdiffusionv2 block {index}: the adaptive sink refresh (adapt_sink_thr={attn.adapt_sink_thr} > -1, "
                "chunks of one frame) re-targets upstream's ring by the similarity of the buffer's bf16 keys, which "
                "this adapter does not reproduce; set adapt_sink_threshold to -1"
            )
        total, state = kv_cache.get("total_steps"), self.ring[index]
        if state is not None and start == 0 and state["global"] != n:
            self.restart(index)  # position 0 after another chunk: a new video (upstream's fresh dicts)
            state.update({"global": 0, "local": 0, "step": total})
        if state is None:
            queue = list(attn.evict_idx[0]) if attn.evict_idx else []  # upstream keeps its queue on the module
            state = self.ring[index] = {"global": 0, "local": 0, "step": total, "queue": queue}
        end, queue = start + n, state["queue"]
        if end > capacity or state["local"] >= capacity:  # upstream's ring: overwrite the queue's first slots
            if total is None:
                raise ConfigError(f"streamdiffusionv2 block {index}: upstream's ring needs kv_cache['total_steps'] "
                                  "(the denoising steps per chunk), as _initialize_kv_cache sets it")
            if not queue:
                raise CacheError(f"streamdiffusionv2 block {index}: upstream's ring queue is empty (a buffer of "
                                 f"{capacity} slots below two chunks of {n})")
            target = queue[0]
            if batch == 1 and state["step"] > 1:
                state["step"] -= 1
            else:
                evicted = queue.pop(0)
                if evicted > sink:
                    queue.append(evicted)
                state["step"] = total
            local = capacity
        else:
            local = state["local"] + end - state["global"]
            rolling = end + n
            if sink < rolling <= capacity and (not queue or queue[-1] != rolling):
                queue.append(rolling)
            target = local
        state["global"], state["local"] = end, local
        if "current_step" in kv_cache:
            kv_cache["current_step"] = state["step"]
        for name, value in (("global_end_index", end), ("local_end_index", local)):
            if name in kv_cache:
                kv_cache[name].fill_(value)
        return target - n, local

    def restart(self, index: int) -> None:
        """Forget block ``index``'s video (its ring queue stays, as upstream's stays on the module)."""
        if self.cache is not None:
            self.cache.layer(index).reset()
        self.chunk[index] = None
        self.settled[index] = []
        if index in self.waiting:
            self.waiting.remove(index)

    def store(self, index: int, slot: int, k: torch.Tensor, v: torch.Tensor, total: int | None = None) -> None:
        """Record the chunk k, v [B, H, n, D] upstream writes at slots ``slot:slot + n`` of block
        ``index``: a rewrite of the chunk being denoised's slots replaces it (upstream overwrites
        them, whichever chunk writes); a write elsewhere appends the held chunk to the cache first,
        and one over slots the cache holds must cover exactly the oldest chunk after the sink,
        which is evicted. Anything else (the sink, part of a chunk, a chunk not the oldest) raises.
        ``total``: the writes a chunk gets (upstream's ``kv_cache["total_steps"]``), if known: a
        write beyond it, or a next chunk before it, raises (see :meth:`settle`)."""
        n = k.shape[2]
        layer = self.build_cache(self.num_blocks).layer(index)
        held, settled = self.chunk[index], self.settled[index]
        if held is not None and held.slot == slot:
            if held.stored or (total is not None and held.writes >= total):
                raise CacheError(
                    f"streamdiffusionv2 block {index}: slots {slot}:{slot + n} are written again after the "
                    f"{held.writes} writes of kv_cache['total_steps'] made them final; set total_steps to the model "
                    "calls per chunk"
                )
            self.chunk[index] = Chunk(slot, n, k, v, held.writes + 1)
            return
        if held is not None:
            if held.slot < slot + n and slot < held.slot + held.tokens:
                raise CacheError(f"streamdiffusionv2 block {index}: slots {slot}:{slot + n} overlap part of the "
                                 f"chunk being denoised at {held.slot}:{held.slot + held.tokens}")
            # a stored chunk keeps no K/V (commit): nothing of it is left to store
            if held.k is not None and index in self.waiting:
                self.flush()
            elif held.k is not None:
                # the chunk is final in every block holding it (upstream moves all blocks on
                # together): compress theirs with this one, in one pass
                self.cache.compress_ahead({j: (c.k, c.v) for j, c in enumerate(self.chunk)
                                           if c is not None and c.slot == held.slot and c.k is not None})
                self.commit(index)
            # a chunk whose earlier writes were dropped (held.k None) raises below, after the
            # errors of a ring, which would explain it
        hit = [r for r in settled if r[0] < slot + n and slot < r[1]]
        sunk = sum(c.tokens for c in layer.sink)
        if hit and not sunk and layer.config.sink_tokens == 0:
            raise CacheError(
                f"streamdiffusionv2 block {index}: upstream's ring starts at slot {slot} of a "
                "buffer sized for global attention (16 chunks or more), where the first chunk, which the ring "
                "keeps, was compressed with the others; size the buffer above the rollout, or below 16 chunks "
                "for a rolling window"
            )
        if slot < sunk or hit not in ([], [(slot, slot + n)]) or (hit and settled[0] != hit[0]):
            raise CacheError(
                f"streamdiffusionv2 block {index}: upstream writes slots {slot}:{slot + n} over the sink "
                f"(0:{sunk}), part of a chunk or a chunk other than the oldest "
                f"(held: {settled[:3]}...), which this adapter does not reproduce; use chunks of one size"
            )
        if held is not None and held.k is None and not held.stored:
            raise CacheError(
                f"streamdiffusionv2 block {index}: the chunk at slots {held.slot}:{held.slot + held.tokens} was "
                f"written {held.writes} times, not the {total} of kv_cache['total_steps'], and its earlier "
                "writes were not kept; set total_steps to the model calls per chunk"
            )
        if hit:
            layer.evict(n)
            settled.pop(0)
        self.chunk[index] = Chunk(slot, n, k, v)

    def commit(self, index: int) -> None:
        """Append block ``index``'s held chunk to its layer and record its slots."""
        held, layer = self.chunk[index], self.cache.layer(index)
        layer.append(held.k, held.v)
        sink = layer.config.sink_tokens
        if held.slot + held.tokens > sink:
            self.settled[index].append((max(held.slot, sink), held.slot + held.tokens))
        self.chunk[index] = Chunk(held.slot, held.tokens, None, None, held.writes, stored=True)

    def settle(self, index: int, total: int | None) -> None:
        """After block ``index`` attended: when the chunks' writes are known (``total``), a chunk
        short of them drops its K/V (the next write replaces them before anything reads them:
        only the last write's stay, as upstream's), and one at its last write waits to be stored,
        ``blocks_per_pass`` blocks in one compression pass (:meth:`flush`), the rest when the
        model's forward returns (whichever blocks it ran). So between model calls no block holds
        its chunk in full precision; with ``total`` unknown the chunk is held until the next chunk
        starts (:meth:`store`)."""
        held = self.chunk[index]
        if total is None:
            return
        if held.writes < total:
            held.k = held.v = None
            return
        self.waiting.append(index)
        if len(self.waiting) >= self.blocks_per_pass:
            self.flush()

    def flush(self) -> None:
        """Store the waiting blocks' final chunks, compressed in one pass (:meth:`KVCache.compress_ahead`)."""
        waiting, self.waiting = self.waiting, []
        if not waiting:
            return
        self.cache.compress_ahead({j: (self.chunk[j].k, self.chunk[j].v) for j in waiting})
        for j in waiting:
            self.commit(j)

    def check_read(self, index: int, read: int) -> None:
        """Upstream attends to slots 0:``read``: they must be exactly the chunks held."""
        held = self.cache.layer(index).tokens + self.chunk[index].tokens
        if held != read:
            raise CacheError(
                f"streamdiffusionv2 block {index}: upstream attends to slots 0:{read}, of which only {held} were "
                "written (the others hold the buffer's zeros), which this adapter does not reproduce; run chunks "
                "of one size, consecutive, in a buffer a whole number of chunks long"
            )

    def attend(self, index: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the chunk's queries [B, H, n, D] to block ``index``'s history and chunk."""
        held = self.chunk[index]
        return self.cache.attend(index, q, extra=(held.k, held.v))

    def pack_block(self, index: int) -> tuple[torch.Tensor, dict]:
        """Block ``index``'s whole state as (uint8 buffer, JSON-able header): its cache layer as
        compressed bytes (:func:`~qkv.caches.transfer.pack_layer`) and the chunk being denoised
        (full precision, as held)."""
        self.check_installed()
        buffer, header = pack_layer(self.build_cache(self.num_blocks).layer(index))
        buf = PackedBytes()
        buf.add(buffer)  # at 0: the layer's offsets stand
        held = self.chunk[index]
        chunk = None if held is None else {"start": held.slot, "tokens": held.tokens, "writes": held.writes,
                                           "stored": held.stored}
        if held is not None and held.k is not None:
            chunk.update(k=tensor_entry(buf, held.k), v=tensor_entry(buf, held.v))
        return buf.buffer(buffer.device), {"layer": header, "chunk": chunk, "settled": self.settled[index],
                                           "ring": self.ring[index], "derived": self.derived}

    def unpack_block(self, index: int, buffer: torch.Tensor, header: dict) -> None:
        """Replace block ``index``'s state by what :meth:`pack_block` packed (tensors on the
        buffer's device); a buffer or header that does not fit raises :class:`CorruptDataError`
        and changes nothing."""
        self.check_installed()
        where = f"streamdiffusionv2 block {index}"
        read = PackedReader(buffer, where)
        chunk = header.get("chunk") if isinstance(header, dict) else None
        if chunk is not None:
            start, tokens, writes = (field(chunk, name, int, where) for name in ("start", "tokens", "writes"))
            k = v = None
            if "k" in chunk or "v" in chunk:
                k, v = read.tensor(chunk.get("k")), read.tensor(chunk.get("v"))
                if k.dim() != 4 or k.shape != v.shape or k.shape[2] != tokens:
                    raise CorruptDataError(f"{where}: a chunk of {tokens} tokens with k {list(k.shape)}, v {list(v.shape)}")
            stored = field(chunk, "stored", bool, where)
            if start < 0 or tokens < 1 or writes < 1 or (stored and k is not None):
                raise CorruptDataError(f"{where}: a chunk at {start} of {tokens} tokens written {writes} times"
                                       f"{', stored, with its K/V' if stored and k is not None else ''}")
            chunk = Chunk(start, tokens, k, v, writes, stored)
        settled = header.get("settled") if isinstance(header, dict) else None
        if not isinstance(settled, list) or not all(
            isinstance(r, list | tuple) and len(r) == 2 and all(isinstance(x, int) for x in r) for r in settled
        ):
            raise CorruptDataError(f"{where}: settled must be a list of (start, end) slots, found {settled!r:.80}")
        ring = header.get("ring")
        if ring is not None and (not isinstance(ring, dict) or sorted(ring) != ["global", "local", "queue", "step"]):
            raise CorruptDataError(f"{where}: ring must hold global, local, step and queue, found {ring!r:.80}")
        if self.cache is None:
            self.derived = field(header, "derived", dict, where)
        unpack_layer(self.build_cache(self.num_blocks, **self.derived).layer(index), buffer,
                     field(header, "layer", dict, where))
        self.chunk[index] = chunk
        self.settled[index] = [tuple(r) for r in settled]
        self.ring[index] = None if ring is None else {**ring, "queue": list(ring["queue"])}

    def drop_block(self, index: int) -> None:
        """Forget block ``index``'s history, chunk and slot bookkeeping (another rank runs it now)."""
        self.restart(index)
        self.ring[index] = None


class KVCacheManager:
    """``streamv2v.communication.KVCacheManager`` for a pipeline on the qkv cache: when blocks
    change owner, their caches move between ranks as compressed bytes instead of bf16 buffers.

    The same calls as upstream (``broadcast_kv_blocks``, ``compute_block_owners``,
    ``rebalance_kv_cache_by_diff``, ``cleanup_kv_cache``), so it stands in for upstream's manager
    where ``ModelDataTransfer`` takes one. ``handle``: this rank's :func:`install` handle;
    ``device``: where received blocks go (default where messages live: the CPU on gloo, the current
    GPU on NCCL); ``group``: the process group (default the world; ranks are numbered within it).
    A moved block keeps its positions (upstream shifts ``global_end_index`` for its stream
    batching, which the adapter does not run)."""

    def __init__(self, handle: StreamDiffusionV2Handle, device=None, group=None) -> None:
        self.handle, self.device, self.group = handle, device, group

    def broadcast_kv_blocks(self, block_indices: list[int], donor_rank: int) -> int:
        """Give every rank ``donor_rank``'s state of blocks ``block_indices`` (every rank calls
        it); returns the bytes broadcast."""
        sent = 0
        mine = dist.get_rank(self.group) == donor_rank
        for index in block_indices:
            packed = self.handle.pack_block(index) if mine else None
            buffer, header, n = broadcast_packed(packed, donor_rank, self.group, f"streamdiffusionv2 block {index}")
            if not mine:
                self.handle.unpack_block(index, buffer.to(load_device(self.device or buffer.device)), header)
            sent += n
        return sent

    @staticmethod
    def compute_block_owners(block_intervals: torch.Tensor, total_blocks: int) -> torch.Tensor:
        """The owner rank of every block (-1: none) from each rank's ``[start, end)`` interval
        (``block_intervals`` [world, 2])."""
        owners = torch.full((total_blocks,), -1, dtype=torch.int64)
        for rank, (start, end) in enumerate(block_intervals.tolist()):
            owners[start:end] = rank
        return owners

    def rebalance_kv_cache_by_diff(self, old_block_intervals: torch.Tensor, new_block_intervals: torch.Tensor,
                                   total_blocks: int) -> int:
        """Broadcast every block whose owner changes from its old owner (every rank calls it);
        returns the bytes broadcast."""
        old = self.compute_block_owners(old_block_intervals, total_blocks).tolist()
        new = self.compute_block_owners(new_block_intervals, total_blocks).tolist()
        moved: dict[int, list[int]] = {}
        for index, (before, after) in enumerate(zip(old, new)):
            if before != after and before >= 0:
                moved.setdefault(before, []).append(index)
        return sum(self.broadcast_kv_blocks(blocks, donor) for donor, blocks in sorted(moved.items()))

    def cleanup_kv_cache(self, block_intervals: torch.Tensor, total_blocks: int) -> None:
        """Drop the state of every block this rank does not own (upstream zeroes their buffers;
        here their memory is freed)."""
        rank = dist.get_rank(self.group)
        for index, owner in enumerate(self.compute_block_owners(block_intervals, total_blocks).tolist()):
            if owner != rank:
                self.handle.drop_block(index)


def _windowed(capacity: int, sink: int, n: int) -> bool:
    """Whether a buffer of ``capacity`` slots is upstream's rolling window for chunks of ``n``
    tokens after a sink of ``sink`` (fewer than 16 chunks after it), not sized for global attention."""
    return capacity - max(1, sink // n) * n < 16 * n


def _total_steps(kv_cache: dict, index: int) -> int | None:
    """``kv_cache["total_steps"]``: the model calls per chunk (upstream's ring counts them too),
    None where the dict has none."""
    total = kv_cache.get("total_steps")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ConfigError(f"streamdiffusionv2 block {index}: kv_cache['total_steps'] must be a positive int, got {total!r}")
    return total


def _forward(handle: StreamDiffusionV2Handle, index: int, original):
    """``CausalWanSelfAttention.forward`` for block ``index`` with the cache's attention."""
    causal_model = _upstream()

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, current_end=0,
                causal_rope_cache=None):
        if kv_cache is None:  # the training path (flex attention over the whole clip): upstream's own
            return original(x, seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start, current_end,
                            causal_rope_cache)
        handle.check_installed()
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        frame_tokens = math.prod(grid_sizes[0][1:]).item()
        start = handle.start_of(current_start)
        rope = dict(grid_sizes=grid_sizes, freqs=freqs, start_frame=start // frame_tokens, rope_cache=causal_rope_cache)
        roped_q = causal_model.causal_rope_apply(q, **rope).type_as(v)
        roped_k = causal_model.causal_rope_apply(k, **rope).type_as(v)
        handle.configure(self, s, kv_cache["k"].shape[1], frame_tokens)
        slot, read = handle.place(index, self, kv_cache, start, s, frame_tokens)
        # upstream's ring puts a chunk's later writes elsewhere than its first (which stays): in a
        # windowed buffer the chunk is held until the next one starts, as without total_steps
        windowed = _windowed(kv_cache["k"].shape[1], self.sink_size * frame_tokens, s)
        total = None if windowed else _total_steps(kv_cache, index)
        handle.store(index, slot, roped_k.transpose(1, 2), v.transpose(1, 2), total)
        handle.check_read(index, read)
        out = handle.attend(index, roped_q.transpose(1, 2))  # [B, H, s, D]
        handle.settle(index, total)
        return self.o(out.transpose(1, 2).flatten(2))

    return forward


def meta_kv_cache(pipeline, batch_size: int, dtype: torch.dtype, device) -> None:
    """``CausalStreamInferencePipeline._initialize_kv_cache`` with the K/V buffers on the meta
    device: the same dicts (shape, indices, step counters) and block settings, no memory."""
    for block in pipeline.generator.model.blocks[: pipeline.num_transformer_blocks]:
        block.self_attn.sink_size = pipeline.num_sink_tokens
        block.self_attn.adapt_sink_thr = pipeline.adapt_sink_threshold
    shape = (batch_size, pipeline.kv_cache_length, pipeline.num_heads, 128)
    steps = len(pipeline.denoising_step_list)
    pipeline.kv_cache1 = [
        {
            "k": torch.empty(shape, dtype=dtype, device="meta"),
            "v": torch.empty(shape, dtype=dtype, device="meta"),
            "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
            "total_steps": steps,
            "current_step": steps,
        }
        for _ in range(pipeline.num_transformer_blocks)
    ]


def install(target, policy: Policy | str = "qvg", *, blocks_per_pass: int = 8,
            **cache_options) -> StreamDiffusionV2Handle:
    """Run ``target`` (a ``CausalWanModel`` or a ``CausalStreamInferencePipeline``) on a
    compressed cache. ``policy``: a :class:`Policy` or preset/spec; ``blocks_per_pass``: the
    blocks whose final chunks are compressed together, in one pass (more: fewer launches, more
    K/V held in bf16 meanwhile); ``cache_options``: the :class:`~qkv.KVCache` options
    (``span_chunks``: one chunk by default, ``attention``, ...) except ``num_layers``,
    ``max_spans``, ``sink_chunks`` and ``sink_tokens``, which follow from the model and its
    buffer. Returns the handle (``memory()``, ``remove()``)."""
    model, pipeline = _model_of(target)
    handle = StreamDiffusionV2Handle(model, policy, cache_options, blocks_per_pass)
    for index, block in enumerate(model.blocks):
        attn = block.self_attn
        handle.patches.set(attn, "forward", types.MethodType(_forward(handle, index, attn.forward), attn))
    model_forward = model.forward

    def forward(*args, **kwargs):
        out = model_forward(*args, **kwargs)
        handle.flush()  # the final chunks of the blocks this forward ran that still wait for a pass
        return out

    handle.patches.set(model, "forward", forward)
    if pipeline is not None and hasattr(pipeline, "_initialize_kv_cache"):
        handle.patches.set(pipeline, "_initialize_kv_cache",
                           lambda batch_size, dtype, device: meta_kv_cache(pipeline, batch_size, dtype, device))
    return handle
