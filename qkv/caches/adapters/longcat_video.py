"""LongCat-Video's condition-frame cache (``kv_cache_dict``) on a qkv cache.

LongCat-Video (github meituan-longcat/LongCat-Video) continues a video from its last frames
(``LongCatVideoPipeline.generate_vc``, which the long-video demo calls segment after segment). With
``use_kv_cache=True``, ``_cache_clean_latents`` runs the DiT once over the clean condition latents
with ``return_kv=True``: each block's ``Attention.forward`` (``longcat_video/modules/attention.py``)
returns the tokens' K/V **before** RoPE (after the q/k RMS norms), [B, H, N_cond, D], and
``LongCatVideoTransformer3DModel.forward`` (``modules/longcat_video_dit.py``) collects them as
``kv_cache_dict = {block: (k, v)}`` (``.contiguous()``, or ``.cpu()`` with ``offload_kv_cache``).
Every denoising step then runs the DiT on the noisy latents alone with that dict:
``LongCatSingleStreamBlock.forward`` moves the pair to the device (``.to``) and
``Attention.forward_with_kv_cache`` concatenates [cached, current] K/V, ropes q and k over the
(condition + noise) frame grid (the cached keys at frames [0, num_cond_latents), the current tokens
after them) and attends the current queries to all of it, a batch-1 cache repeated to the batch
(the CFG pair).

:func:`install` patches two methods of each block's ``attn`` instance:

- ``forward``: upstream's own; with ``return_kv=True`` the K/V it returns are roped once at their
  frames (the rows of the RoPE table every denoising step gives them), compressed into a
  :class:`~qkv.KVCache` of their own (one span per block unless ``span_tokens`` cuts it) and
  replaced by :class:`CondKV` stand-ins: the dict the pipeline keeps holds no tensors, and its
  ``.to`` / ``.contiguous`` / ``.cpu`` calls return the stand-in itself.
- ``forward_with_kv_cache``: q/k/v, norms and RoPE as upstream (the current tokens roped at rows
  [N_cond, N_cond + N) of the same table), then ``cache.attend(block, q, extra=(k, v))`` over the
  compressed condition plus the current tokens: the cached K/V are never decompressed as a whole
  nor concatenated. A dict of plain tensors (made before install) still goes through upstream's
  own method.

    handle = qkv.adapters.longcat_video.install(pipe, "qvg")      # pipe.dit, or the DiT itself
    video = pipe.generate_vc(video=frames, prompt=prompt, use_kv_cache=True)   # unchanged

Not reproduced, with a typed error: block-sparse attention over the cache (``enable_bsa``; upstream
uses it for the 720p refinement, which has no cache), context parallelism (``cp_split_hw``). With
``offload_kv_cache=True`` the compressed condition stays on the device it was computed on (the
stand-in's ``.cpu()`` is itself).
"""

from __future__ import annotations

import math
import sys
import types
import weakref

import torch

from qkv.caches.adapters.handle import AdapterHandle
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.errors import CacheError, ConfigError

__all__ = ["CondKV", "LongCatHandle", "install", "rope_rows"]


def rope_rows(rope, x: torch.Tensor, grid: tuple[int, int, int], first: int) -> torch.Tensor:
    """``x`` [B, H, S, D] roped as rows [first, first + S) of ``rope``'s table for the frame grid
    (T, H, W): ``RotaryPositionalEmbedding.forward``'s math (fp32, then x's dtype) on a slice of
    the module's own table, so a cached or a current part is roped exactly as in the concatenation
    upstream ropes whole. A row's angles depend on its (frame, h, w) only, not on T."""
    rope.register_grid_size(grid)
    freqs = rope.freqs_dict[grid][first : first + x.shape[2]].float().to(x.device)
    cos, sin = freqs.cos()[None, None], freqs.sin()[None, None]
    rotate_half = sys.modules[type(rope).__module__].rotate_half  # the function the module itself uses
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class CondKV:
    """What ``kv_cache_dict[block]`` holds in place of one tensor of the condition's (k, v):
    ``part`` 0 (K) or 1 (V) of layer ``index`` of ``cache``. ``shape`` is the tensor's
    ([B, H, N_cond, D]); ``.to``, ``.contiguous`` and ``.cpu`` return the stand-in itself."""

    def __init__(self, cache: KVCache, index: int, part: int, shape: torch.Size) -> None:
        self.cache, self.index, self.part, self.shape = cache, index, part, shape

    def to(self, *args, **kwargs) -> "CondKV":
        return self

    def contiguous(self) -> "CondKV":
        return self

    def cpu(self) -> "CondKV":
        return self

    def __repr__(self) -> str:
        return f"CondKV({'kv'[self.part]}, block {self.index}, shape={tuple(self.shape)})"


class LongCatHandle(AdapterHandle):
    """:class:`AdapterHandle` of a ``LongCatVideoTransformer3DModel``. Every condition pass
    (``return_kv=True``; block 0 starts it) gets a :class:`KVCache` of its own, held by the
    stand-ins of the dict it returns: dicts made side by side stay apart, and a dict the pipeline
    drops frees its cache. ``cache`` is the pass in progress (None between passes);
    :meth:`caches` counts those still referenced."""

    def __init__(self, model, policy: Policy | str, cache_options: dict) -> None:
        super().__init__("longcat_video", policy, cache_options, fixed=("num_layers", "max_spans", "sink_chunks"))
        if "span_chunks" not in cache_options and "span_tokens" not in cache_options:
            self.cache_options["span_chunks"] = 1  # the condition is one chunk: compressed at once
        self.model = model
        self._live: weakref.WeakSet[KVCache] = weakref.WeakSet()

    def caches(self) -> list[KVCache]:
        return list(self._live)

    def capture(self, index: int, rope, grid: tuple[int, int, int], k: torch.Tensor,
                v: torch.Tensor) -> tuple[CondKV, CondKV]:
        """Store block ``index``'s condition K (pre-RoPE) and V [B, H, N_cond, D] from a pass over
        the frame grid ``grid``; returns the stand-ins for the dict."""
        self.check_installed()
        if index == 0 or self.cache is None:
            self.cache = KVCache(self.policy, num_layers=len(self.model.blocks), **self.cache_options)
            self._live.add(self.cache)
        cache = self.cache
        cache.append(index, rope_rows(rope, k, grid, 0), v)
        cache.layer(index).trim()  # no more appends: no tail buffer kept
        if index == len(self.model.blocks) - 1:
            self.cache = None  # the pass is complete: its dict alone keeps the cache alive
        return CondKV(cache, index, 0, k.shape), CondKV(cache, index, 1, v.shape)

    def attend(self, index: int, cond: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cond_tokens: int, scale: float) -> torch.Tensor:
        """Attention of the current queries q [B, H, N, D] to block ``index``'s cached condition
        (``cond``: the dict's stand-ins) and the current k, v: [B, H, N, D]."""
        self.check_installed()
        kc, vc = cond
        if not (isinstance(vc, CondKV) and kc.cache is vc.cache and kc.index == vc.index == index):
            raise CacheError(f"longcat_video block {index}: the cache pair is not this block's condition")
        layer = kc.cache.layer(index)
        if layer.layout is None:
            raise CacheError(f"longcat_video block {index}: the condition cache was reset; run the condition "
                             "pass (return_kv=True) again")
        if layer.tokens != cond_tokens:
            raise CacheError(f"longcat_video block {index}: num_cond_latents covers {cond_tokens} tokens, "
                             f"the cache holds {layer.tokens}")
        rows, batch = layer.layout.batch, q.shape[0]
        if rows == batch:
            return kc.cache.attend(index, q, extra=(k, v), scale=scale)
        if rows != 1:
            raise CacheError(f"longcat_video block {index}: a condition of batch {rows} for a batch of {batch} "
                             "(upstream repeats only a batch-1 condition)")
        # a batch-1 condition for every row (upstream repeats it): one read per row, no copy
        return torch.cat([kc.cache.attend(index, q[i : i + 1], extra=(k[i : i + 1], v[i : i + 1]), scale=scale)
                          for i in range(batch)])


def _forward(handle: LongCatHandle, index: int, original):
    """``Attention.forward``: upstream's own; a ``return_kv`` pass keeps its K/V in the cache."""

    def forward(self, x, shape=None, num_cond_latents=None, return_kv=False):
        if not return_kv:
            return original(x, shape=shape, num_cond_latents=num_cond_latents, return_kv=False)
        out, (k, v) = original(x, shape=shape, num_cond_latents=num_cond_latents, return_kv=True)
        return out, handle.capture(index, self.rope_3d, tuple(shape), k, v)

    return forward


def _forward_with_kv_cache(handle: LongCatHandle, index: int, original):
    """``Attention.forward_with_kv_cache`` attending to the compressed condition."""

    def forward_with_kv_cache(self, x, shape=None, num_cond_latents=None, kv_cache=None):
        if not isinstance(kv_cache[0], CondKV):  # a dict of tensors made before install: upstream's own
            return original(x, shape=shape, num_cond_latents=num_cond_latents, kv_cache=kv_cache)
        t, h, w = shape
        if self.enable_bsa and t > 1:
            raise CacheError("longcat_video: block-sparse attention over the cache (enable_bsa) is not reproduced; "
                             "call dit.disable_bsa() for the cached continuation")
        if not num_cond_latents:
            raise CacheError("longcat_video: a cached read needs num_cond_latents > 0 (as upstream's)")
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        grid, first = (t + num_cond_latents, h, w), num_cond_latents * h * w
        q, k = rope_rows(self.rope_3d, q, grid, first), rope_rows(self.rope_3d, k, grid, first)
        out = handle.attend(index, kv_cache, q, k, v, first, self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    return forward_with_kv_cache


def install(target, policy: Policy | str = "qvg", **cache_options) -> LongCatHandle:
    """Run ``target`` (a ``LongCatVideoTransformer3DModel``, or a pipeline with ``.dit``) on
    compressed condition caches. ``policy``: a :class:`Policy` or preset/spec; ``cache_options``:
    the :class:`~qkv.KVCache` options (``span_chunks`` defaults to 1 here: the condition is one
    span per block; ``span_tokens`` cuts it; not ``num_layers``, ``max_spans`` nor ``sink_chunks``).
    Returns the handle (``memory()``, ``reset()``, ``remove()``)."""
    model = getattr(target, "dit", target)
    if type(model).__name__ != "LongCatVideoTransformer3DModel":
        raise ConfigError(f"longcat_video: expected a LongCatVideoTransformer3DModel or a pipeline holding one "
                          f"(.dit), got {type(model).__name__}")
    if model.cp_split_hw is not None and math.prod(model.cp_split_hw) > 1:
        raise ConfigError("longcat_video: context parallelism (cp_split_hw) is not supported by this adapter")
    handle = LongCatHandle(model, policy, cache_options)
    for index, block in enumerate(model.blocks):
        attn = block.attn
        handle.patches.set(attn, "forward", types.MethodType(_forward(handle, index, attn.forward), attn))
        handle.patches.set(attn, "forward_with_kv_cache",
                           types.MethodType(_forward_with_kv_cache(handle, index, attn.forward_with_kv_cache), attn))
    return handle
