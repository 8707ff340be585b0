"""Self-Forcing pipelines on a compressed :class:`KVCache`: :func:`install` puts the drop-in cache
dicts of :mod:`qkv.caches.adapters.self_forcing_blocks` in every cache list the pipeline makes and
routes each block's self-attention through them.

:func:`install` covers the pipelines that allocate these dicts (``CausalInferencePipeline``,
``CausalDiffusionInferencePipeline`` with its two caches, ``SelfForcingTrainingPipeline``, and
``demo.py``, which calls ``_initialize_kv_cache`` itself): it replaces the pipeline's
``_initialize_kv_cache`` by one that runs the original on the meta device (so the buffer length
is what upstream computes, allocating nothing) and puts drop-ins in every cache list it made,
shaped from the model (its blocks, heads and head size) rather than the pipeline's constants.
"""

from __future__ import annotations

import inspect
import math
import sys
import types

import torch

from qkv.caches.adapters.handle import AdapterHandle
from qkv.caches.adapters.self_forcing_blocks import SelfForcingBlockCache, SlotView, cache_options, self_forcing_kv_cache
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.component import check_int
from qkv.errors import ConfigError

__all__ = ["SelfForcingBlockCache", "SelfForcingHandle", "SlotView", "cache_options", "install", "self_forcing_kv_cache"]


class SelfForcingHandle(AdapterHandle):
    """:class:`AdapterHandle` of a Self-Forcing pipeline: one :class:`KVCache` per cache list the
    pipeline allocates (by attribute name: ``kv_cache1``, or ``kv_cache_pos`` and
    ``kv_cache_neg``), and the drop-in dicts in them."""

    def __init__(self, pipeline, policy: Policy | str, options: dict, blocks_per_pass: int = 8) -> None:
        super().__init__("self_forcing", policy, options, fixed=("num_layers", "max_spans", "sink_chunks", "sink_tokens"))
        check_int("self_forcing", "blocks_per_pass", blocks_per_pass, 1)
        self.blocks_per_pass = blocks_per_pass
        self.writes_per_chunk: int | None = None  # while the pipeline's own inference runs (see install)
        self.counting = False  # inside the pipeline's own inference, without an initial latent
        self.pipeline = pipeline
        self.model = pipeline.generator.model
        self.named: dict[str, KVCache] = {}
        self.blocks: dict[str, list[SelfForcingBlockCache]] = {}

    def caches(self) -> list[KVCache]:
        return list(self.named.values())

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [p for blocks in self.blocks.values() for block in blocks for p in block.pending()]

    def reset(self) -> None:
        super().reset()
        for blocks in self.blocks.values():
            for block in blocks:
                block.restart()

    def derived_options(self) -> dict:
        """:func:`cache_options` from the model's attention (``sink_size`` of its first block) and
        the pipeline's frame tokens and frames per chunk; spans passed to :func:`install` win over
        its one-chunk spans."""
        options = cache_options(
            frame_tokens=self.pipeline.frame_seq_length,
            chunk_frames=getattr(self.pipeline, "num_frame_per_block", 1),
            sink_size=getattr(self.model.blocks[0].self_attn, "sink_size", 0),
        )
        if {"span_chunks", "span_tokens"} & set(self.cache_options):
            options.pop("span_tokens", None)
        return options

    def allocate(self, name: str, meta: list[dict], device) -> list[SelfForcingBlockCache]:
        """Drop-ins for the cache list ``name`` that upstream's ``_initialize_kv_cache`` made as
        ``meta`` (on the meta device): its batch and buffer length, the model's blocks, heads and
        head size; the cache of ``name`` is made once and reset on every later allocation."""
        model = self.model
        batch, capacity, _, _ = meta[0]["k"].shape
        cache = self.named.get(name)
        if cache is None:
            cache = self.named[name] = KVCache(self.policy, num_layers=len(model.blocks), **self.cache_options,
                                               **self.derived_options())
        cache.reset()
        blocks = self_forcing_kv_cache(cache, num_blocks=len(model.blocks), batch_size=batch, capacity=capacity,
                                       heads=model.num_heads, head_dim=model.dim // model.num_heads,
                                       dtype=meta[0]["k"].dtype, device=device, blocks_per_pass=self.blocks_per_pass)
        blocks[0].group.writes_per_chunk = self.writes_per_chunk
        self.blocks[name] = blocks
        return blocks

    def run_inference(self, original, *args, **kwargs):
        """The pipeline's own ``inference``, whose chunks each get the same number of attention
        steps, so each block's chunk is stored at its last write and dropped after the others
        (:meth:`SelfForcingBlockCache._settle`): ``CausalInferencePipeline``'s
        ``len(denoising_step_list)`` denoising steps and the clean context pass;
        ``CausalDiffusionInferencePipeline``'s sample scheduler's timesteps and the context pass,
        in each of its two caches (counted when a chunk makes its scheduler:
        :meth:`sample_scheduler`). Not with an ``initial_latent``, whose frames get the context
        pass alone."""
        bound = inspect.signature(original).bind(*args, **kwargs)
        self.counting = bound.arguments.get("initial_latent") is None
        steps = getattr(self.pipeline, "denoising_step_list", None)
        self.set_writes(len(steps) + 1 if self.counting and steps is not None else None)
        try:
            return original(*args, **kwargs)
        finally:
            self.counting = False
            self.set_writes(None)

    def sample_scheduler(self, original, *args, **kwargs):
        """``CausalDiffusionInferencePipeline._initialize_sample_scheduler``, made once per chunk:
        the chunk's writes are its timesteps and the context pass."""
        scheduler = original(*args, **kwargs)
        if self.counting:
            self.set_writes(len(scheduler.timesteps) + 1)
        return scheduler

    def set_writes(self, writes: int | None) -> None:
        """The attention steps each chunk gets from now on (None: unknown), in every cache list."""
        self.writes_per_chunk = writes
        for blocks in self.blocks.values():
            blocks[0].group.writes_per_chunk = writes


def _meta_lists(pipeline) -> dict[str, list[dict]]:
    """The pipeline's attributes that are lists of cache dicts with K on the meta device."""
    return {
        name: value
        for name, value in vars(pipeline).items()
        if isinstance(value, list) and value and isinstance(value[0], dict)
        and torch.is_tensor(value[0].get("k")) and value[0]["k"].is_meta and "global_end_index" in value[0]
    }


def _self_attention(original):
    """``CausalWanSelfAttention.forward`` whose cache branch, given a drop-in, runs
    :meth:`SelfForcingBlockCache.attention_step` (upstream's q/k/v projections, norms,
    ``causal_rope_apply`` of the module that defines the class, and output projection around it);
    anything else (no cache: training's flex attention; plain dicts) runs upstream's own."""

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None):
        if not isinstance(kv_cache, SelfForcingBlockCache):
            return original(x, seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start, cache_start)
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        frame_tokens = math.prod(grid_sizes[0][1:]).item()
        start = int(current_start)
        rope = sys.modules[type(self).__module__].causal_rope_apply
        roped_q = rope(q, grid_sizes, freqs, start_frame=start // frame_tokens).type_as(v)
        roped_k = rope(k, grid_sizes, freqs, start_frame=start // frame_tokens).type_as(v)
        out = kv_cache.attention_step(roped_q, roped_k, v, start, local_attn_size=self.local_attn_size,
                                      sink_tokens=self.sink_size * frame_tokens,
                                      max_attention_size=self.max_attention_size)
        return self.o(out.flatten(2))

    return forward


def _attention_modules(model) -> list:
    """The blocks' ``CausalWanSelfAttention`` modules (those with upstream's projections)."""
    return [b.self_attn for b in model.blocks if isinstance(b.self_attn, torch.nn.Module)
            and all(hasattr(b.self_attn, name) for name in ("q", "k", "v", "o", "norm_q", "norm_k"))]


def install(pipeline, policy: Policy | str = "qvg", *, blocks_per_pass: int = 8, **options) -> SelfForcingHandle:
    """Give a Self-Forcing pipeline (anything with ``generator.model``, ``frame_seq_length`` and
    ``_initialize_kv_cache(batch_size, dtype, device)``) drop-in caches on a compressed
    :class:`KVCache`. ``policy``: a :class:`Policy` or preset/spec; ``options``: the KVCache
    options except ``num_layers``, ``max_spans`` and the sink, which follow from the model
    (:meth:`SelfForcingHandle.derived_options`; spans of one chunk unless given). The blocks'
    ``CausalWanSelfAttention.forward`` attend to the compressed spans (:meth:`SelfForcingBlockCache.attention_step`).
    In the own ``inference`` of a ``CausalInferencePipeline`` or a ``CausalDiffusionInferencePipeline``
    (CFG; both give every chunk the same denoising steps and the clean context pass), a chunk is
    stored at its last write, ``blocks_per_pass`` blocks in one compression pass (more: fewer
    launches, more K/V held in bf16 meanwhile), and no block holds its chunk in full precision
    between steps; elsewhere (``demo.py``'s loop, the training pipeline, an ``initial_latent``)
    until the next chunk starts.
    Returns the handle (``memory()``: every cache and the chunks being written; ``remove()``)."""
    model = getattr(getattr(pipeline, "generator", None), "model", None)
    if model is None or not hasattr(model, "blocks") or not hasattr(pipeline, "_initialize_kv_cache"):
        raise ConfigError(
            f"self_forcing: expected a pipeline with .generator.model and _initialize_kv_cache, got {type(pipeline).__name__}"
        )
    handle = SelfForcingHandle(pipeline, policy, options, blocks_per_pass)
    original = pipeline._initialize_kv_cache

    def initialize(batch_size, dtype, device):
        handle.check_installed()
        original(batch_size=batch_size, dtype=dtype, device="meta")
        made = _meta_lists(pipeline)
        if not made:
            raise ConfigError("self_forcing: _initialize_kv_cache made no list of per-block cache dicts")
        for name, meta in made.items():
            setattr(pipeline, name, handle.allocate(name, meta, device))

    handle.patches.set(pipeline, "_initialize_kv_cache", initialize)
    kind = type(pipeline).__name__
    cfg = kind == "CausalDiffusionInferencePipeline" and hasattr(pipeline, "_initialize_sample_scheduler")
    if cfg or (kind == "CausalInferencePipeline" and hasattr(pipeline, "denoising_step_list")):
        inference = pipeline.inference
        handle.patches.set(pipeline, "inference",
                           lambda *args, **kwargs: handle.run_inference(inference, *args, **kwargs))
    if cfg:
        make = pipeline._initialize_sample_scheduler
        handle.patches.set(pipeline, "_initialize_sample_scheduler",
                           lambda *args, **kwargs: handle.sample_scheduler(make, *args, **kwargs))
    for attn in _attention_modules(model):
        handle.patches.set(attn, "forward", types.MethodType(_self_attention(attn.forward), attn))
    return handle
