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

from qkv.caches.adapters.handle import AdapterHandle
from qkv.caches.policy import Policy
from qkv.errors import CacheError, ConfigError

__all__ = ["StreamDiffusionV2Handle", "install", "meta_kv_cache"]


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
