"""A ``transformers`` Cache (``cache_utils`` API of transformers >= 5.24, < 6) backed by a :class:`qkv.KVCache`.

    from qkv.caches.adapters.transformers_cache import QKVCache, encoder_decoder_cache
    cache = QKVCache("qvg-int4", span_tokens=32)
    out = model.generate(**inputs, cache=cache)                                 # decoder-only
    out = whisper.generate(features, cache=encoder_decoder_cache("rtn", span_tokens=32))

Each model layer gets a :class:`QKVLayer` around the cache's :class:`LayerCache`: ``update(k, v)``
appends the step's K/V ``[B, H, S_new, D]`` as one chunk and returns the retained history (spans
decompressed one by one, nothing decompressed kept). Spans are compressed once, when complete, and
never re-quantized; the fp tail holds the newest tokens (a policy's ``window`` is a minimum tail).

``get_seq_length()`` counts every token ever appended (positions stay absolute when a sink and a
sliding window evict tokens); ``get_mask_sizes`` gives the retained length with the matching offset,
which is exact for causal attention without padding. ``crop`` is not supported (no rollback of
compressed spans), so assisted decoding is not either; beam search reorders batch rows of the
compressed data directly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, EncoderDecoderCache

from qkv.caches.kvcache import KVCache, LayerCache
from qkv.caches.policy import Policy
from qkv.errors import CacheError

__all__ = ["QKVCache", "QKVLayer", "encoder_decoder_cache"]


class QKVLayer(CacheLayerMixin):
    """One layer of :class:`QKVCache`: a ``CacheLayerMixin`` over a :class:`LayerCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, layer: LayerCache) -> None:
        super().__init__()
        self.layer = layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` [B, H, S_new, D]; return the history [B, H, S, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.layer.append(key_states, value_states)
        return self.layer.read()

    def get_seq_length(self) -> int:
        return self.layer.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        retained = self.layer.tokens
        return retained + query_length, self.layer.seen - retained

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.layer.reset()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.layer.index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.layer.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.layer.layout is not None:
            self.layer.index_batch(torch.arange(self.layer.layout[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise CacheError("a compressed cache cannot be cropped (compressed spans are never rolled back)")

    def offload(self) -> None:
        if self.is_initialized:
            self.layer.to("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self.layer.to(self.device)


class QKVCache(Cache):
    """A ``transformers.Cache`` whose layers compress with ``policy`` (a :class:`Policy`, preset
    name or spec) through a :class:`KVCache`; ``options`` go to :class:`KVCache` (e.g.
    ``span_tokens=32``, ``sink_chunks=1``, ``max_spans=8``). Pass an existing ``KVCache`` as
    ``policy`` to wrap it. Layers are created as the model first uses them."""

    def __init__(self, policy: Policy | str | KVCache, **options) -> None:
        if isinstance(policy, KVCache):
            if options:
                raise CacheError("options apply to a new KVCache, not to an existing one")
            self.kv = policy
        else:
            self.kv = KVCache(policy, **options)
        super().__init__(layers=[QKVLayer(layer) for layer in self.kv.layers])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(QKVLayer(self.kv.layer(len(self.layers))))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory(self):
        """Exact stored bytes (:class:`qkv.caches.kvcache.CacheMemory`)."""
        return self.kv.memory()


def encoder_decoder_cache(policy: Policy | str | KVCache, **options) -> EncoderDecoderCache:
    """For encoder-decoder models (Whisper): compressed self-attention cache, plain cross-attention
    cache (the encoder's K/V are computed once and are not streamed)."""
    return EncoderDecoderCache(QKVCache(policy, **options), DynamicCache())
