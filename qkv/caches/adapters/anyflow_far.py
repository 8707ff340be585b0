"""diffusers' AnyFlow-FAR (frame-autoregressive Wan) on qkv caches.

``AnyFlowFARTransformer3DModel`` (diffusers >= 0.42, ``transformer_anyflow_far.py``) keeps, per
block, ``kv_cache[i] = {"compressed_cache", "full_cache"}`` ([2, B, H, L, D] each, keys before
RoPE): ``pipeline_anyflow_far.py`` re-encodes the whole clean context after every chunk (the
cache-prefill step, ``kv_cache_flag["is_cache_step"]``: a flex-attention pass with a chunk-causal
mask over the context, the oldest chunks at a 4x coarser patch size ("compressed" frames), the
newest ``full_chunk_limit - 1`` chunks at full resolution) and writes its K/V there; each
denoising step of the next chunk (the cache-read step) attends its queries to [compressed
context, full context, chunk], roped together.

:func:`install` sets each ``attn1``'s processor to :class:`FARCacheProcessor` and, by default
(``prefill="incremental"``), the model's ``_forward_cache`` to :func:`_incremental_forward_cache`:

- a cache-prefill step runs only the chunks the caches lack through the blocks (the chunk just
  demoted to the coarse patch size and the full-resolution chunks, ~1/4 of the context's tokens
  at 32 chunks); each of them attends to the cached coarse context and to their tokens up to its
  own end (chunk-causal, as upstream's mask). That is all the context a re-encoding changes: under
  the chunk-causal mask a coarse chunk sees only older coarse chunks, so the coarse context only
  grows and its K/V come out the same at every prefill. With ``prefill="full"`` the step runs
  the upstream processor itself over the whole context (its output is the prefill's attention,
  unchanged) on a stand-in cache that hands over the K/V it writes, and only the coarse chunks
  the cache lacks are kept. Either way the keys are roped at their positions (the positions the
  read step gives the same tokens), the new coarse chunks are appended to one
  :class:`~qkv.KVCache` and compressed once, and the full-resolution context replaces the previous
  one in another (the ``recent`` cache: compressed at once, or kept exact with
  ``recent_full_precision=True``; its k-means starts from the centroids of the context it
  replaces, the two overlapping in all but one chunk).
- a cache-read step computes q/k/v as the upstream processor does, ropes the queries and the
  chunk's keys, and attends with ``qkv.kernels.attention`` over the compressed spans of both
  caches plus the chunk (and the zero keys the upstream adds: it pads q, k and v to a multiple
  of 128 tokens and, with no mask at that step, its queries attend to the padding too).

    handle = qkv.adapters.anyflow_far.install(pipe, "qvg")    # the pipeline (or the transformer alone)
    video = pipe(prompt, ...)                                # unchanged
    handle.memory(); handle.remove()

``AnyFlowFARPipeline.__call__`` allocates zero-filled cache tensors of the whole video's bf16
cache; installed on the pipeline, those come out as zero-stride views of one zero
(:class:`_CacheTensorsAsViews`). Running the transformer directly, pass ``handle.kv_cache()``
(per-block placeholders, no tensors) as ``kv_cache``.

The prefill's mask: upstream's ``build_attention_mask(mode="cache")`` evaluates its mask function
on every (query, key) pair of the context at once (``create_block_mask`` without compilation:
tensors of context^2 elements; 3.8 GB on the CPU at 16 chunks of Wan2.1-1.3B sizes,
``benchmarks/anyflow_mask_memory.py``), a peak of the rollout's own, cache or not. :func:`install` replaces the model's ``build_attention_mask``
for that mode with :func:`cache_block_mask`, the same ``BlockMask`` (same blocks, same order, same
mask on every pair) built from each 128-token block's first and last chunk (the pipeline builds
it before every prefill; the incremental prefill does not use it).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.nn.attention.flex_attention import BlockMask
from torch.overrides import TorchFunctionMode

from qkv.caches.adapters.chunk_causal_mask import chunk_causal_block_mask
from qkv.caches.adapters.context_parallel import refuse_context_parallel
from qkv.caches.adapters.handle import AdapterHandle, attend_parts, diffusers_transformer
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.component import check_choice, check_int
from qkv.errors import CacheError

__all__ = ["FARCacheProcessor", "FARHandle", "cache_block_mask", "chunk_causal_block_mask", "install"]


def _upstream():
    from diffusers.models.transformers import transformer_anyflow_far  # imported on first use only

    return transformer_anyflow_far


# why diffusers' context parallelism cannot run here (docs/adapters/anyflow_far.md, "Several GPUs")
NO_CONTEXT_PARALLEL = ("diffusers has no context-parallel plan for AnyFlowFARTransformer3DModel, and its prefill's "
                       "flex-attention backend has no context-parallel path")


# what install's prefill may be: upstream's re-encoding of the whole context, or only what the caches lack
PREFILLS = ("full", "incremental")


def _frame_tokens(cfg, height: int, width: int) -> tuple[int, int]:
    """Tokens of a latent frame of ``height`` x ``width`` at the full and at the coarse patch size."""
    return ((height // cfg.patch_size[1]) * (width // cfg.patch_size[2]),
            (height // cfg.compressed_patch_size[1]) * (width // cfg.compressed_patch_size[2]))


def context_tokens(model, chunk_partition: list[int], height: int, width: int) -> tuple[list[int], int]:
    """Tokens per chunk of a cache-prefill's context (frames ``chunk_partition``, latents ``height``
    x ``width``) and how many of the chunks are coarse: the oldest at the coarse patch size, the
    newest ``full_chunk_limit - 1`` at full resolution (all of them while there are no more)."""
    full, coarse = _frame_tokens(model.config, height, width)
    n_coarse = max(0, len(chunk_partition) - (model.config.full_chunk_limit - 1))
    return [f * (coarse if i < n_coarse else full) for i, f in enumerate(chunk_partition)], n_coarse


def cache_block_mask(model, chunk_partition: list[int], height: int, width: int,
                     device: torch.device | str | None = None) -> BlockMask:
    """``model.build_attention_mask(chunk_partition=..., height=..., width=..., device=...,
    mode="cache")`` of an ``AnyFlowFARTransformer3DModel``, built by :func:`chunk_causal_block_mask`
    over the context's chunks (:func:`context_tokens`)."""
    return chunk_causal_block_mask(context_tokens(model, chunk_partition, height, width)[0], device)


def _mask_builder(model, upstream):
    """``model.build_attention_mask`` with the cache mode (no clean context) built blockwise."""

    def build_attention_mask(*, chunk_partition, height, width, has_clean_context=False, device=None, mode="train"):
        if mode == "cache" and not has_clean_context:
            return cache_block_mask(model, list(chunk_partition), height, width, device)
        return upstream(chunk_partition=chunk_partition, height=height, width=width,
                        has_clean_context=has_clean_context, device=device, mode=mode)

    return build_attention_mask


class _Capture(dict):
    """A stand-in ``kv_cache[i]``: the upstream processor's prefill writes
    ``cache[name][0 or 1, :, :, :n, :] = x`` are recorded as ``{name: (k, v)}``."""

    class _Slot:
        def __init__(self, store: dict, name: str) -> None:
            self.store, self.name = store, name

        def __setitem__(self, index, value: torch.Tensor) -> None:
            if not (isinstance(index, tuple) and index[0] in (0, 1)):
                raise CacheError(f"anyflow_far: unexpected cache write {self.name}[{index!r}]")
            self.store.setdefault(self.name, [None, None])[index[0]] = value

    def __init__(self) -> None:
        super().__init__()
        self.written: dict[str, list] = {}

    def __missing__(self, name: str):
        return self._Slot(self.written, name)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """An incremental prefill: the tokens of each chunk that goes through the blocks, how many of
    them are coarse (the first ones), and whether the video is new (nothing cached carries over)."""

    chunk_tokens: list[int]
    coarse_tokens: int
    new: bool


class FARHandle(AdapterHandle):
    """:class:`AdapterHandle` of an ``AnyFlowFARTransformer3DModel``: ``context`` (the coarse
    context, grows) and ``recent`` (the full-resolution context, replaced at every prefill)."""

    def __init__(self, model, policy: Policy | str, cache_options: dict, recent_full_precision: bool,
                 blocks_per_pass: int) -> None:
        super().__init__("anyflow_far", policy, cache_options, fixed=("num_layers", "max_spans"))
        check_int("anyflow_far", "blocks_per_pass", blocks_per_pass, 1)
        self.model = model
        blocks = len(model.blocks)
        self.cache = KVCache(policy, num_layers=blocks, **cache_options)
        shared = {k: v for k, v in cache_options.items() if k in ("warm_start", "validate",
                                                                  "backend", "attention")}
        # one chunk per prefill: span_chunks=1 compresses it at once, 2 keeps it in the tail (exact)
        self.recent = KVCache(self.cache.policy, num_layers=blocks, span_chunks=2 if recent_full_precision else 1,
                              **shared)
        self.blocks_per_pass = blocks_per_pass
        # per block, what its prefill wrote and the caches have not stored yet: (a new video,
        # the new coarse context k, v or None, the full-resolution context k, v)
        self.waiting: dict[int, tuple[bool, tuple | None, tuple]] = {}
        self.plan: _Plan | None = None  # the incremental prefill under way

    def caches(self) -> list[KVCache]:
        return [] if self.removed else [self.cache, self.recent]

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [kv for new, coarse, full in self.waiting.values() for kv in ((coarse, full) if coarse else (full,))]

    def reset(self) -> None:
        super().reset()
        self.waiting, self.plan = {}, None

    def check_installed(self) -> None:
        super().check_installed()
        refuse_context_parallel(self.model, self.client, NO_CONTEXT_PARALLEL)

    def kv_cache(self) -> list[dict]:
        """What to pass as the transformer's ``kv_cache`` when calling it directly."""
        return [{} for _ in self.model.blocks]

    def prefill(self, index: int, written: dict, rope_key: torch.Tensor, flag: dict) -> None:
        """Take the K/V upstream's prefill wrote for block ``index`` (keys roped with ``rope_key``):
        the coarse chunks the cache lacks and the full-resolution context (:meth:`hold`)."""
        nc = flag["num_compressed_tokens"]
        (kc, vc), (kf, vf) = written["compressed_cache"], written["full_cache"]
        keys = _upstream().apply_rotary_emb(torch.cat([kc, kf], 2), rope_key)
        kc, kf = keys[:, :, :nc], keys[:, :, nc:]
        context = self.cache.layer(index)
        new = flag["num_cached_chunks"] == 0 or nc < context.tokens  # a new video: nothing carries over
        have = 0 if new else context.tokens
        self.hold(index, new, (kc[:, :, have:], vc[:, :, have:]), (kf, vf))

    def hold(self, index: int, new: bool, coarse: tuple, full: tuple) -> None:
        """Hold a prefill's K/V of block ``index`` (``coarse``: the coarse context the cache lacks,
        ``full``: the full-resolution context; keys roped); they are stored with those of the blocks
        before it, ``blocks_per_pass`` blocks in one compression pass (:meth:`store`), at the last
        block, or at the next read, whichever comes first. ``new``: a new video."""
        if index in self.waiting:  # a second prefill before the last one was stored
            self.store()
        kept = (coarse[0].contiguous(), coarse[1].contiguous()) if coarse[0].shape[2] else None
        self.waiting[index] = (new, kept, (full[0].contiguous(), full[1].contiguous()))
        if len(self.waiting) >= self.blocks_per_pass or index == len(self.model.blocks) - 1:
            self.store()

    def plan_prefill(self, chunk_tokens: list[int], coarse_chunks: int, first_video_prefill: bool) -> int:
        """Plan an incremental prefill of a context of chunks of ``chunk_tokens`` tokens, the first
        ``coarse_chunks`` of them coarse: the coarse chunks the cache holds are skipped, the rest
        (the coarse chunks it lacks, then the full-resolution ones) go through the blocks. Returns
        the number of chunks skipped. The caches are emptied first when nothing carries over (a new
        video, or a cache that holds no whole chunks of this context)."""
        if self.waiting:
            self.store()
        blocks = range(len(self.model.blocks))
        held = {self.cache.layer(i).tokens if self.cache.layer(i).layout else 0 for i in blocks}
        tokens = held.pop() if len(held) == 1 else None
        ends = [sum(chunk_tokens[:n]) for n in range(coarse_chunks + 1)]
        new = first_video_prefill or tokens not in ends
        if new:
            for i in blocks:
                self.cache.layer(i).reset()
                self.recent.layer(i).reset()
        skip = 0 if new else ends.index(tokens)
        self.plan = _Plan(chunk_tokens[skip:], ends[coarse_chunks] - ends[skip], new)
        return skip

    def prefill_attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The incremental prefill's attention, chunk-causal: the queries of each planned chunk to
        the cached coarse context and the planned tokens up to the chunk's end; the K/V are held
        for the caches (:meth:`hold`). q, k, v [B, H, S, D], keys roped."""
        plan, context = self.plan, self.cache.layer(index)
        out, start = [], 0
        for n in plan.chunk_tokens:
            if n:
                end = start + n
                parts = [context, (k[:, :, :end], v[:, :, :end])]
                out.append(attend_parts(self.cache.config, q[:, :, start:end], parts))
                start = end
        c = plan.coarse_tokens
        self.hold(index, plan.new, (k[:, :, :c], v[:, :, :c]), (k[:, :, c:], v[:, :, c:]))
        return torch.cat(out, 2)

    def store(self) -> None:
        """Store what the prefills of the waiting blocks wrote: the new coarse context appended,
        the full-resolution context replacing the last one (its k-means warm-started from the
        context it replaces), each cache's chunks compressed in one pass for all those blocks
        (:meth:`KVCache.compress_ahead`)."""
        waiting, self.waiting = self.waiting, {}
        for index, (new, _, _) in waiting.items():
            if new:
                self.cache.layer(index).reset()
                self.recent.layer(index).reset()
        self.cache.compress_ahead({i: coarse for i, (_, coarse, _) in waiting.items() if coarse is not None})
        self.recent.compress_ahead({i: full for i, (_, _, full) in waiting.items()})
        for index, (_, coarse, full) in waiting.items():
            if coarse is not None:
                self.cache.layer(index).append(*coarse)
            self.recent.layer(index).replace(*full)

    def attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flag: dict) -> torch.Tensor:
        """The read step's attention: q [B, H, Sq, D] to [context, recent, (k, v)]."""
        if self.waiting:
            self.store()
        context, recent = self.cache.layer(index), self.recent.layer(index)
        want = (flag["num_cached_compressed_tokens"], flag["num_cached_full_tokens"])
        if flag["num_cached_chunks"] == 0:  # the first chunk of a new video
            context.reset()
            recent.reset()
        held = (context.tokens if context.layout else 0, recent.tokens if recent.layout else 0)
        if held != want:
            raise CacheError(f"anyflow_far block {index}: the step expects {want} cached (coarse, full) tokens, "
                             f"the caches hold {held}; run the cache-prefill step first")
        return attend_parts(self.cache.config, q, [context, recent, (k, v)])


def _project(attn, hidden_states: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, S, D] of ``hidden_states`` as upstream's processor computes them, q and k
    roped with ``freqs`` (the tokens' own positions)."""
    target = hidden_states.dtype
    query = attn.norm_q(attn.to_q(hidden_states)).to(target)
    key = attn.norm_k(attn.to_k(hidden_states)).to(target)
    value = attn.to_v(hidden_states)
    query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
    apply = _upstream().apply_rotary_emb
    return apply(query, freqs), apply(key, freqs), value


class FARCacheProcessor:
    """``attn1`` processor: the prefill through the upstream processor (or, in an incremental
    prefill, the planned chunks to the caches), reads from the qkv caches."""

    def __init__(self, handle: FARHandle, index: int, upstream) -> None:
        self.handle, self.index, self.upstream = handle, index, upstream

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 kv_cache=None, kv_cache_flag=None):
        if kv_cache is None:  # the training rollout: upstream's own
            return self.upstream(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        self.handle.check_installed()
        if kv_cache_flag["is_cache_step"] and self.handle.plan is None:
            capture = _Capture()
            out = self.upstream(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                                kv_cache=capture, kv_cache_flag=kv_cache_flag)
            self.handle.prefill(self.index, capture.written, rotary_emb["key"], kv_cache_flag)
            return out
        seq = hidden_states.shape[1]
        query, key, value = _project(attn, hidden_states, rotary_emb["key"][:, :, -seq:])
        if kv_cache_flag["is_cache_step"]:  # an incremental prefill
            out = self.handle.prefill_attend(self.index, query, key, value)
        else:  # the upstream processor's read step, with the history from the qkv caches
            pad = math.ceil(seq / 128) * 128 - seq  # upstream's zero padding, attended to at this step
            if pad:
                zeros = key.new_zeros(*key.shape[:2], pad, key.shape[3])
                key, value = torch.cat([key, zeros], 2), torch.cat([value, zeros.to(value.dtype)], 2)
            out = self.handle.attend(self.index, query, key, value, kv_cache_flag)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _incremental_forward_cache(model, handle: FARHandle, upstream):
    """``model._forward_cache`` (the cache-prefill step) that runs only the chunks the caches lack
    through the blocks: the coarse chunks not yet cached, then the full-resolution chunks, sliced
    by frame from upstream's patch embedding, timestep embedding and RoPE (each per frame). A
    prefill with clean frames (training) goes to upstream's."""

    def _forward_cache(hidden_states, chunk_partition, timestep, r_timestep, encoder_hidden_states,
                       encoder_hidden_states_image=None, attention_mask=None, return_dict=True,
                       clean_hidden_states=None, clean_timestep=None, kv_cache=None, kv_cache_flag=None):
        if clean_hidden_states is not None:
            return upstream(hidden_states=hidden_states, chunk_partition=chunk_partition, timestep=timestep,
                            r_timestep=r_timestep, encoder_hidden_states=encoder_hidden_states,
                            encoder_hidden_states_image=encoder_hidden_states_image, attention_mask=attention_mask,
                            return_dict=return_dict, clean_hidden_states=clean_hidden_states,
                            clean_timestep=clean_timestep, kv_cache=kv_cache, kv_cache_flag=kv_cache_flag)
        cfg, part = model.config, list(chunk_partition)
        height, width = hidden_states.shape[-2:]
        tokens, n_coarse = context_tokens(model, part, height, width)
        full, coarse = _frame_tokens(cfg, height, width)
        far_cfg = {
            "total_frames": sum(part), "num_full_frames": sum(part[n_coarse:]),
            "num_compressed_frames": sum(part[:n_coarse]),
            "full_frame_shape": (height // cfg.patch_size[1], width // cfg.patch_size[2]),
            "compressed_frame_shape": (height // cfg.compressed_patch_size[1], width // cfg.compressed_patch_size[2]),
            "full_token_per_frame": full, "compressed_token_per_frame": coarse,
        }
        kv_cache_flag["num_full_tokens"] = far_cfg["num_full_frames"] * full
        kv_cache_flag["num_compressed_tokens"] = far_cfg["num_compressed_frames"] * coarse
        skip = handle.plan_prefill(tokens, n_coarse, kv_cache_flag["num_cached_chunks"] == 0)
        try:
            f0 = sum(part[:skip])  # the first frame that goes through the blocks
            kept = {**far_cfg, "num_compressed_frames": far_cfg["num_compressed_frames"] - f0}
            freqs = model.rope(far_cfg=far_cfg, device=hidden_states.device)["key"][:, :, sum(tokens[:skip]) :]
            x = model._forward_far_patchify(hidden_states.permute(0, 2, 1, 3, 4)[:, :, f0:], far_cfg=kept)
            _, timestep_proj, text, image = model.condition_embedder(
                timestep[:, f0:], r_timestep[:, f0:], encoder_hidden_states, encoder_hidden_states_image, far_cfg=kept)
            timestep_proj = timestep_proj.unflatten(2, (6, -1))
            if image is not None:
                text = torch.concat([image, text], dim=1)
            rotary_emb = {"query": freqs, "key": freqs}
            for index, block in enumerate(model.blocks):  # (no checkpointing: the caches store no gradients)
                x = block(x, text, timestep_proj, rotary_emb, None, kv_cache[index], kv_cache_flag)
        finally:
            handle.plan = None
        if not return_dict:
            return None, kv_cache
        return _upstream().AnyFlowFARTransformerOutput(sample=None, kv_cache=kv_cache)

    return _forward_cache


class _CacheTensorsAsViews(TorchFunctionMode):
    """Active from the start of ``AnyFlowFARPipeline.__call__`` to the transformer's first forward
    (:meth:`close`): the per-block cache tensors ``__call__`` allocates (``torch.zeros`` of
    [2, batch, heads, tokens, head_dim] in the transformer's dtype) come out as zero-stride views
    of a single zero. Once installed, nothing reads or writes them; a write of several elements
    (as upstream's prefill writes them) raises, since they share one address, so a tensor taken
    for one by mistake could not be filled silently."""

    def __init__(self, heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dtype, self.open = heads, head_dim, dtype, False

    def __enter__(self):
        self.open = True
        return super().__enter__()

    def close(self, *_) -> None:
        """Leave the mode (a forward pre-hook of the transformer: it is then on top of the stack)."""
        if self.open:
            self.open = False
            super().__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.zeros:
            size = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else args
            if (len(size) == 5 and size[0] == 2 and size[2] == self.heads and size[4] == self.head_dim
                    and kwargs.get("dtype") == self.dtype):
                return torch.zeros((), dtype=kwargs.get("dtype"), device=kwargs.get("device")).expand(size)
        return func(*args, **kwargs)


def _without_cache_tensors(base: type, model) -> type:
    """A subclass of the pipeline class ``base`` (same name) whose ``__call__`` is ``base``'s with
    the per-block cache tensors allocated as views (:class:`_CacheTensorsAsViews`)."""

    def __call__(self, *args, **kwargs):
        mode = _CacheTensorsAsViews(model.config.num_attention_heads, model.config.attention_head_dim, model.dtype)
        hook = model.register_forward_pre_hook(mode.close)
        mode.__enter__()
        try:
            return base.__call__(self, *args, **kwargs)
        finally:
            mode.close()
            hook.remove()

    return type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                          "__qualname__": base.__qualname__, "__doc__": base.__doc__})


def install(target, policy: Policy | str = "qvg", *, recent_full_precision: bool = False, blocks_per_pass: int = 8,
            prefill: str = "incremental", **cache_options) -> FARHandle:
    """Run ``target`` (an ``AnyFlowFARTransformer3DModel`` or a pipeline with ``.transformer``)
    on compressed caches. ``policy``: a :class:`Policy` or preset/spec; ``cache_options``: the
    coarse context cache's :class:`~qkv.KVCache` options (``span_chunks``: FAR chunks per span,
    ...; not ``num_layers`` nor ``max_spans``); ``recent_full_precision``: keep the full-resolution context in bf16 instead of
    compressing it at each prefill; ``blocks_per_pass``: the blocks whose prefill K/V are compressed
    together, in one pass (more: fewer launches, more K/V held in bf16 meanwhile); ``prefill``:
    ``"incremental"`` (the default) re-encodes only the chunks the caches lack at a cache-prefill
    step, attending to the cached coarse context (:func:`_incremental_forward_cache`; the same
    result up to rounding with a lossless policy, the compressed history with a lossy one),
    ``"full"`` the whole clean context through upstream's processor, as upstream does. The model's
    ``build_attention_mask`` builds the prefill's mask blockwise (:func:`cache_block_mask`) until
    ``remove()``. Returns the handle (``memory()``, ``remove()``)."""
    model = diffusers_transformer(target, "AnyFlowFARTransformer3DModel", "anyflow_far")
    refuse_context_parallel(model, "anyflow_far", NO_CONTEXT_PARALLEL)
    check_choice("anyflow_far", "prefill", prefill, PREFILLS)
    handle = FARHandle(model, policy, cache_options, recent_full_precision, blocks_per_pass)
    handle.patches.set(model, "build_attention_mask", _mask_builder(model, model.build_attention_mask))
    if prefill == "incremental":
        handle.patches.set(model, "_forward_cache", _incremental_forward_cache(model, handle, model._forward_cache))
    if target is not model:  # the pipeline: its __call__ allocates no cache tensors
        handle.patches.set(target, "__class__", _without_cache_tensors(type(target), model))
    for index, block in enumerate(model.blocks):
        handle.patches.set(block.attn1, "processor", FARCacheProcessor(handle, index, block.attn1.processor))
    return handle
