"""diffusers' SANA-WM refiner (chunk-causal LTX-2 with an attention sink) on a qkv cache.

``SanaWMLTX2RefinerTransformer3DModel`` (diffusers >= 0.42, ``transformer_sana_wm_refiner.py``)
attends each active block's queries to ``[sink, recent history, active block]``;
``pipelines/sana_wm/refiner.py`` drives its ``SanaWMRefinerKVCache``: the sink's K/V are captured
once **before** RoPE (``kv_cache_mode="capture_pre_rope"``) and re-roped in every window at a
sliding offset (``sink_pe``); each refined block's K/V are captured **after** RoPE
(``"inject_and_capture_post_rope"``), concatenated to the history, and the history is cut to its
newest ``kv_max_frames - sink_size`` frames; the denoising steps (``"inject"``) only read.

:func:`install` sets each ``attn1``'s processor to :class:`SanaWMCacheProcessor`, which keeps the
K/V itself and leaves in the pipeline's ``SanaWMRefinerKVCache`` zero-width stand-ins
([B, tokens, 0]: no memory) that the pipeline's own bookkeeping (``torch.cat``, the
``[:, -keep:]`` cut) runs on unchanged, so their token counts say what upstream would hold:

- ``"capture_pre_rope"`` runs the upstream processor (its output unchanged) and keeps the captured
  pre-RoPE sink K/V compressed by the policy (one frame by default; ``sink_full_precision=True``
  keeps them exact); a new sink starts a new video;
- ``"inject"`` / ``"inject_and_capture_post_rope"`` compute q/k/v and RoPE as the upstream
  processor does, decompress and re-rope the sink at the window's ``sink_pe`` and attend over
  [sink, compressed history spans, block]; the capture mode then appends the block's post-RoPE K/V
  to the history layer (one span per block unless ``span_chunks`` says otherwise);
- the pipeline's cut of a stand-in to its window (``store_history``, wrapped on the per-call layer
  cache) cuts the history layer to the same token count at once (``LayerCache.evict``).

    handle = qkv.adapters.sana_wm.install(refiner, "qvg")   # the refiner pipeline, or its transformer
    latents = refiner(...)                                  # unchanged
    handle.memory(); handle.remove()
"""

from __future__ import annotations

import torch

from qkv.caches.adapters.context_parallel import refuse_context_parallel
from qkv.caches.adapters.handle import AdapterHandle, attend_parts, diffusers_transformer
from qkv.caches.cache_config import CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.component import check_int
from qkv.compressed import CompressedKV
from qkv.errors import CacheError

__all__ = ["SanaWMCacheProcessor", "SanaWMHandle", "install"]

# why diffusers' context parallelism cannot run here (docs/adapters/sana_wm.md, "Several GPUs")
NO_CONTEXT_PARALLEL = ("diffusers has no context-parallel plan for SanaWMLTX2RefinerTransformer3DModel (its pipeline "
                       "keeps the sink and history of whole sequences)")


def _upstream():
    from diffusers.models.transformers import transformer_sana_wm_refiner  # imported on first use only

    return transformer_sana_wm_refiner


def _stand_in(x: torch.Tensor) -> torch.Tensor:
    """A [B, tokens, 0] tensor: ``x``'s token count, no data."""
    return x.new_empty(x.shape[0], x.shape[1], 0)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H * D] -> [B, H, S, D]."""
    return x.unflatten(2, (heads, -1)).transpose(1, 2)


class SanaWMHandle(AdapterHandle):
    """:class:`AdapterHandle` of a SANA-WM refiner: ``cache`` holds the history (one layer per
    block); ``sinks[i]`` the sink K/V of block i (pre-RoPE, [B, H, S, D])."""

    def __init__(self, model, policy: Policy | str, cache_options: dict, sink_full_precision: bool,
                 blocks_per_pass: int) -> None:
        super().__init__("sana_wm", policy, cache_options, fixed=("num_layers", "max_spans", "sink_chunks"))
        check_int("sana_wm", "blocks_per_pass", blocks_per_pass, 1)
        if "span_chunks" not in cache_options and "span_tokens" not in cache_options:
            cache_options = {**cache_options, "span_chunks": 1}  # the window is ~3 blocks: a span per block
        self.model = model
        self.cache = KVCache(policy, num_layers=len(model.transformer_blocks), **cache_options)
        self.sink_full_precision = sink_full_precision
        self.sinks: list[CompressedKV | tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.transformer_blocks)
        self.blocks_per_pass = blocks_per_pass
        self.waiting: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per block, a captured block not stored yet
        self.raw_sinks: set[int] = set()  # blocks whose captured sink waits for its compression pass

    def reset(self) -> None:
        super().reset()
        self.sinks = [None] * len(self.sinks)
        self.waiting = {}
        self.raw_sinks = set()

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [s for s in self.sinks if isinstance(s, tuple)] + list(self.waiting.values())

    def hold(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Block ``index``'s captured post-RoPE K/V [B, H, S, D], stored with those of the blocks
        before it: ``blocks_per_pass`` blocks in one compression pass (:meth:`store`), at the last
        block, or before the block's next attention, whichever comes first."""
        self.waiting[index] = (k, v)
        if len(self.waiting) >= self.blocks_per_pass or index == len(self.sinks) - 1:
            self.store()

    def store(self) -> None:
        """Append every waiting block's K/V to its history layer, compressed in one pass
        (:meth:`KVCache.compress_ahead`: the same spans, bit for bit, as block by block)."""
        waiting, self.waiting = self.waiting, {}
        self.cache.compress_ahead(waiting)
        for index, (k, v) in waiting.items():
            self.cache.layer(index).append(k, v)

    def check_installed(self) -> None:
        super().check_installed()
        refuse_context_parallel(self.model, self.client, NO_CONTEXT_PARALLEL)

    def memory(self) -> CacheMemory:
        """The history cache, plus every block's sink (compressed, or exact as ``tail``)."""
        mem = super().memory()
        for s in self.sinks:
            if isinstance(s, CompressedKV):
                b, h, n, d = s.k.shape
                mem = mem + CacheMemory(compressed=s.nbytes, tokens=n, elements=2 * b * h * n * d)
        return mem

    def set_sink(self, index: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Block ``index``'s sink (pre-RoPE [B, H, S, D]); its history starts over. A sink to
        compress waits, as a captured block does (:meth:`hold`), for ``blocks_per_pass`` blocks' sinks
        or the last block's, or for its first read, then they are compressed in one pass
        (:meth:`compress_sinks`)."""
        self.sinks[index] = (k.contiguous(), v.contiguous())
        self.cache.layer(index).reset()
        if not self.sink_full_precision:
            self.raw_sinks.add(index)
            if len(self.raw_sinks) >= self.blocks_per_pass or index == len(self.sinks) - 1:
                self.compress_sinks()

    def compress_sinks(self) -> None:
        """Compress every waiting sink in one pass (:meth:`Policy.compress_many`, one value check
        for all of them: the same sinks, bit for bit, as one by one)."""
        indices, self.raw_sinks = sorted(self.raw_sinks), set()
        cfg = self.cache.config
        done = cfg.span_policy.compress_many([self.sinks[i] for i in indices], backend=cfg.backend,
                                             validate=cfg.validate, names=[f"sana_wm block {i}: sink" for i in indices])
        for i, ckv in zip(indices, done):
            self.sinks[i] = ckv

    def sink(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index``'s sink K/V, pre-RoPE [B, H, S, D] (the sink alone is decompressed)."""
        if index in self.raw_sinks:
            self.compress_sinks()
        s = self.sinks[index]
        if s is None:
            raise CacheError(f"sana_wm block {index}: no sink captured (run capture_pre_rope first)")
        if isinstance(s, tuple):
            return s
        return self.cache.config.span_policy.decompress(s, backend=self.cache.config.backend)


class SanaWMCacheProcessor:
    """``attn1`` processor: the sink and history from the qkv cache, stand-ins for the pipeline."""

    def __init__(self, handle: SanaWMHandle, index: int, upstream) -> None:
        self.handle, self.index, self.upstream = handle, index, upstream

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
                 key_rotary_emb=None, sink_rotary_emb=None, kv_cache=None, kv_cache_mode=None):
        if self.index in self.handle.waiting:  # its last captured block, before anything reads or resets it
            self.handle.store()
        if kv_cache_mode is None or kv_cache_mode == "capture_pre_rope":
            capture = _upstream().SanaWMRefinerKVLayerCache() if kv_cache_mode else None
            out = self.upstream(attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                                key_rotary_emb, sink_rotary_emb, capture, kv_cache_mode)
            if kv_cache_mode:
                self.handle.check_installed()
                k, v = capture.get_captured_pre_rope()
                self.handle.set_sink(self.index, _heads(k, attn.heads), _heads(v, attn.heads))
                kv_cache.store_captured_pre_rope(_stand_in(k), _stand_in(v))
            return out
        self.handle.check_installed()
        up = _upstream()
        if attn.rope_type not in ("interleaved", "split"):
            raise ValueError(f"Unsupported LTX-2 RoPE type: {attn.rope_type}")
        rope = up.apply_interleaved_rotary_emb if attn.rope_type == "interleaved" else up.apply_split_rotary_emb
        gate_logits = attn.to_gate_logits(hidden_states) if attn.to_gate_logits is not None else None
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        query, key = rope(query, query_rotary_emb), rope(key, query_rotary_emb)
        parts = []
        if kv_cache.get_sink() is not None:
            if sink_rotary_emb is None:
                raise ValueError("Injecting the attention sink requires the `sink_pe` RoPE tuple on the KV cache.")
            sink_k, sink_v = self.handle.sink(self.index)
            sink_k = rope(sink_k.transpose(1, 2).flatten(2).to(key.dtype), sink_rotary_emb)  # roped as [B, S, H * D]
            parts.append((_heads(sink_k, attn.heads), sink_v.to(value.dtype)))
        history = kv_cache.get_history()
        layer = self.handle.cache.layer(self.index)
        keep = history[0].shape[1] if history is not None else 0
        held = layer.tokens if layer.layout is not None else 0
        if held < keep:
            raise CacheError(f"sana_wm block {self.index}: the pipeline's history has {keep} tokens, the cache {held}")
        _follow_cuts(kv_cache, self.handle, self.index)
        if held > keep:
            layer.evict(held - keep)  # the pipeline cut its history to the window
        k, v = _heads(key, attn.heads), _heads(value, attn.heads)
        out = attend_parts(self.handle.cache.config, _heads(query, attn.heads), [*parts, layer, (k, v)])
        if kv_cache_mode == "inject_and_capture_post_rope":
            self.handle.hold(self.index, k, v)
            kv_cache.store_captured_post_rope(_stand_in(key), _stand_in(value))
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)
            hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class _CutFollower:
    """A pipeline layer cache's ``store_history``, then the history layer cut to the stand-in's
    token count: what the pipeline cuts after a block's capture leaves the cache at once, not at
    the block's next forward (until which it would hold the cut frames as well)."""

    def __init__(self, original, handle: SanaWMHandle, index: int) -> None:
        self.original, self.handle, self.index = original, handle, index

    def __call__(self, history_k: torch.Tensor, history_v: torch.Tensor) -> None:
        self.original(history_k, history_v)
        if self.handle.removed or self.handle.sinks[self.index] is None:
            return
        if self.index in self.handle.waiting:  # its captured block first: the cut counts it
            self.handle.store()
        layer = self.handle.cache.layer(self.index)
        held = layer.tokens if layer.layout is not None else 0
        if held > history_k.shape[1]:
            layer.evict(held - history_k.shape[1])


def _follow_cuts(kv_cache, handle: SanaWMHandle, index: int) -> None:
    """Wrap ``kv_cache.store_history`` (the pipeline's layer cache, made per call) in a
    :class:`_CutFollower` of ``handle``, once (a follower of a removed handle passes through)."""
    current = kv_cache.__dict__.get("store_history")
    if not (isinstance(current, _CutFollower) and current.handle is handle and current.index == index):
        kv_cache.store_history = _CutFollower(kv_cache.store_history, handle, index)


def install(target, policy: Policy | str = "qvg", *, sink_full_precision: bool = False, blocks_per_pass: int = 8,
            **cache_options) -> SanaWMHandle:
    """Run ``target`` (a ``SanaWMLTX2RefinerTransformer3DModel`` or a pipeline with
    ``.transformer``) on a compressed cache. ``policy``: a :class:`Policy` or preset/spec;
    ``cache_options``: the history's :class:`~qkv.KVCache` options (``span_chunks`` defaults to 1
    here: a span per refined block; not ``num_layers``, ``max_spans`` nor ``sink_chunks``: the
    pipeline's window decides); ``sink_full_precision``: keep the sink exact instead of
    compressed; ``blocks_per_pass``: the blocks whose captured K/V (and sinks) are compressed
    together, in one pass (more: fewer launches, more K/V held in bf16 meanwhile). Returns the handle
    (``memory()``, ``remove()``)."""
    model = diffusers_transformer(target, "SanaWMLTX2RefinerTransformer3DModel", "sana_wm")
    refuse_context_parallel(model, "sana_wm", NO_CONTEXT_PARALLEL)
    handle = SanaWMHandle(model, policy, cache_options, sink_full_precision, blocks_per_pass)
    for index, block in enumerate(model.transformer_blocks):
        handle.patches.set(block.attn1, "processor", SanaWMCacheProcessor(handle, index, block.attn1.processor))
    return handle
