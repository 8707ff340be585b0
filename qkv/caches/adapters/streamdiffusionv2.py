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

Not reproduced, with a typed error where it would matter: rows of one batch at different positions
(the stream-batch ``inference_stream``, each row a chunk at another denoising step), and the
upstream's in-place ring buffer once a chunk reaches the capacity (its slot bookkeeping, made for
stream batching, re-targets the rewrites of a chunk's denoising steps); with global attention
(capacity above the rollout, what the compressed cache makes affordable) neither arises.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist

from qkv.caches.adapters.handle import AdapterHandle
from qkv.caches.policy import Policy
from qkv.caches.transfer import PackedReader, broadcast_packed, pack_layer, tensor_entry, unpack_layer
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


class StreamDiffusionV2Handle(AdapterHandle):
    """:class:`AdapterHandle` of a ``CausalWanModel``; per block, the chunk being denoised."""

    def __init__(self, model, policy: Policy | str, cache_options: dict) -> None:
        super().__init__("streamdiffusionv2", policy, cache_options, fixed=("num_layers", "max_spans"))
        self.model = model
        self.num_blocks = len(model.blocks)
        # per block: (first token, k, v [B, H, n, D]) of the chunk being denoised, not yet appended
        self.chunk: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None] * self.num_blocks

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [c[1:] for c in self.chunk if c is not None]

    def reset(self) -> None:
        super().reset()
        self.chunk = [None] * self.num_blocks

    def store(self, index: int, start: int, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        """Record the chunk at ``start`` (k, v [B, H, n, D]) for block ``index``: a rewrite of the
        chunk being denoised replaces it; the next chunk appends it to the cache first; position
        0 on a used block starts a new video. Raises where upstream would start its ring buffer."""
        n = k.shape[2]
        layer = self.build_cache(self.num_blocks).layer(index)
        held = self.chunk[index]
        rewrite = held is not None and start == held[0]
        if start + n > capacity or (rewrite and start + n == capacity):
            # upstream enters its ring when the chunk passes the buffer's end, and also on the
            # second call of the chunk that exactly fills it (local_end_index >= L)
            raise CacheError(
                f"streamdiffusionv2 block {index}: tokens {start}:{start + n} reach the cache capacity {capacity}, "
                "where upstream starts overwriting its buffer in place (a ring meant for stream batching), which "
                "this adapter does not reproduce; size the capacity above the rollout (global attention)"
            )
        if rewrite:
            pass  # another denoising step of the same chunk
        elif held is not None and start == held[0] + held[1].shape[2]:
            layer.append(held[1], held[2])
        elif start == 0:
            layer.reset()
        else:
            expected = held[0] + held[1].shape[2] if held is not None else 0
            raise CacheError(
                f"streamdiffusionv2 block {index}: a chunk at token {start}, expected {expected} (the next chunk), "
                f"{held[0] if held is not None else 0} (the chunk being denoised) or 0 (a new video)"
            )
        self.chunk[index] = (start, k, v)

    def attend(self, index: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of the chunk's queries [B, H, n, D] to block ``index``'s history and chunk."""
        _, k, v = self.chunk[index]
        return self.cache.attend(index, q, extra=(k, v))

    def pack_block(self, index: int) -> tuple[torch.Tensor, dict]:
        """Block ``index``'s whole state as (uint8 buffer, JSON-able header): its cache layer as
        compressed bytes (:func:`~qkv.caches.transfer.pack_layer`) and the chunk being denoised
        (full precision, as held)."""
        self.check_installed()
        buffer, header = pack_layer(self.build_cache(self.num_blocks).layer(index))
        buf = PackedBytes()
        buf.add(buffer)  # at 0: the layer's offsets stand
        held = self.chunk[index]
        chunk = None if held is None else {"start": held[0], "k": tensor_entry(buf, held[1]),
                                           "v": tensor_entry(buf, held[2])}
        return buf.buffer(buffer.device), {"layer": header, "chunk": chunk}

    def unpack_block(self, index: int, buffer: torch.Tensor, header: dict) -> None:
        """Replace block ``index``'s state by what :meth:`pack_block` packed (tensors on the
        buffer's device); a buffer or header that does not fit raises :class:`CorruptDataError`
        and changes nothing."""
        self.check_installed()
        where = f"streamdiffusionv2 block {index}"
        read = PackedReader(buffer, where)
        chunk = header.get("chunk") if isinstance(header, dict) else None
        if chunk is not None:
            start, k, v = field(chunk, "start", int, where), read.tensor(chunk.get("k")), read.tensor(chunk.get("v"))
            if start < 0 or k.dim() != 4 or k.shape != v.shape:
                raise CorruptDataError(f"{where}: a chunk at {start} of k {list(k.shape)}, v {list(v.shape)}")
            chunk = (start, k, v)
        unpack_layer(self.build_cache(self.num_blocks).layer(index), buffer, field(header, "layer", dict, where))
        self.chunk[index] = chunk

    def drop_block(self, index: int) -> None:
        """Forget block ``index``'s history and chunk (another rank runs it now)."""
        if self.cache is not None:
            self.cache.layer(index).reset()
        self.chunk[index] = None


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
        start = _starts(current_start)
        rope = dict(grid_sizes=grid_sizes, freqs=freqs, start_frame=start // frame_tokens, rope_cache=causal_rope_cache)
        roped_q = causal_model.causal_rope_apply(q, **rope).type_as(v)
        roped_k = causal_model.causal_rope_apply(k, **rope).type_as(v)
        capacity = kv_cache["k"].shape[1]
        handle.store(index, start, roped_k.transpose(1, 2), v.transpose(1, 2), capacity)
        out = handle.attend(index, roped_q.transpose(1, 2))  # [B, H, s, D]
        held = handle.cache.layer(index).tokens
        for name, value in (("global_end_index", start + s), ("local_end_index", held + s)):
            if name in kv_cache:
                kv_cache[name].fill_(value)
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


def install(target, policy: Policy | str = "qvg", **cache_options) -> StreamDiffusionV2Handle:
    """Run ``target`` (a ``CausalWanModel`` or a ``CausalStreamInferencePipeline``) on a
    compressed cache. ``policy``: a :class:`Policy` or preset/spec; ``cache_options``: the
    :class:`~qkv.KVCache` options (``span_chunks``, ``sink_chunks``, ``attention``, ...) except
    ``num_layers`` and ``max_spans``, which follow from the model and its cache. Returns the handle (``memory()``,
    ``remove()``)."""
    model, pipeline = _model_of(target)
    handle = StreamDiffusionV2Handle(model, policy, cache_options)
    for index, block in enumerate(model.blocks):
        attn = block.self_attn
        handle.patches.set(attn, "forward", types.MethodType(_forward(handle, index, attn.forward), attn))
    if pipeline is not None and hasattr(pipeline, "_initialize_kv_cache"):
        handle.patches.set(pipeline, "_initialize_kv_cache",
                           lambda batch_size, dtype, device: meta_kv_cache(pipeline, batch_size, dtype, device))
    return handle
