"""A ``transformers`` Cache (``cache_utils`` API of transformers >= 5.24, < 6) backed by a :class:`qkv.KVCache`.

    from qkv.caches.adapters.transformers_cache import QKVCache, encoder_decoder_cache
    cache = QKVCache("qvg-int4", span_tokens=32)
    out = model.generate(**inputs, cache=cache)                                 # decoder-only
    out = whisper.generate(features, cache=encoder_decoder_cache("rtn", span_tokens=32))

Each model layer gets a :class:`QKVLayer` around the cache's :class:`LayerCache`: ``update(k, v)``
appends the step's K/V ``[B, H, S_new, D]`` as one chunk and returns the retained history (spans
decompressed one by one, nothing decompressed kept). Spans are compressed once, when complete, and
never re-quantized; the fp tail holds the newest tokens (a policy's ``window`` stays there:
KIVI's residual, see :mod:`qkv.caches.kvcache`).

``get_seq_length()`` counts every token ever appended (positions stay absolute when a sink and a
sliding window evict tokens); ``get_mask_sizes`` gives the retained length with the matching offset,
which is exact for causal attention without padding. ``crop`` drops the newest tokens from the
full-precision tail (assisted decoding's rejected candidates; compressed spans are never rolled
back, so keep ``recent_chunks=1``); beam search reorders batch rows of the compressed data directly.

**Attending to the compressed spans directly.** Importing this module registers the attention
function :func:`qkv_attention` as ``attn_implementation="qkv"`` (transformers 5.x
``AttentionInterface``). With it and ``QKVCache(..., direct=True)``, a one-token step appends its
K/V and hands the model the layer itself (:class:`QKVLayer` marks the step's tensors), and
:func:`qkv_attention` calls :meth:`KVCache.attend` (the decode kernel on a GPU): the history is
never decompressed per token. Steps of several tokens (the prompt, assisted decoding's candidates)
and padded batches (a mask) get the decompressed history and transformers' SDPA, as without it::

    model.set_attn_implementation("qkv")
    out = model.generate(**inputs, cache=QKVCache("kivi", direct=True))
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, EncoderDecoderCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qkv.caches.kvcache import KVCache, LayerCache
from qkv.caches.policy import Policy
from qkv.errors import CacheError

__all__ = ["ATTENTION", "QKVCache", "QKVLayer", "encoder_decoder_cache", "qkv_attention"]

# the attn_implementation name under which qkv_attention is registered
ATTENTION = "qkv"


class QKVLayer(CacheLayerMixin):
    """One layer of :class:`QKVCache`: a ``CacheLayerMixin`` over a :class:`LayerCache`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, layer: LayerCache, direct: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.direct = direct
        self.pending = False  # a step's tensors were handed out and not yet attended through qkv_attention

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` [B, H, S_new, D]; return the history [B, H, S, D],
        or with ``direct`` and one new token the step's own tensors marked with this layer (for
        :func:`qkv_attention`, which attends to the compressed history itself)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise CacheError(
                f"QKVCache(direct=True) needs the model to attend through qkv's attention: "
                f"model.set_attn_implementation({ATTENTION!r})"
            )
        self.layer.append(key_states, value_states)
        if self.direct and key_states.shape[2] == 1:
            key_states, value_states = key_states.detach(), value_states.detach()
            key_states.qkv_layer = self
            self.pending = True
            return key_states, value_states
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
        """Drop the ``-tokens_to_remove`` newest tokens (transformers >= 5.2x; a positive value,
        the older API, is the length to keep). Only full-precision tail tokens can go."""
        drop = -tokens_to_remove if tokens_to_remove <= 0 else self.layer.seen - tokens_to_remove
        if drop and self.is_initialized:
            self.layer.drop_newest(drop)

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

    def __init__(self, policy: Policy | str | KVCache, *, direct: bool = False, **options) -> None:
        if isinstance(policy, KVCache):
            if options:
                raise CacheError("options apply to a new KVCache, not to an existing one")
            self.kv = policy
        else:
            self.kv = KVCache(policy, **options)
        self.direct = direct
        super().__init__(layers=[QKVLayer(layer, direct) for layer in self.kv.layers])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(QKVLayer(self.kv.layer(len(self.layers)), self.direct))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory(self):
        """Exact stored bytes (:class:`qkv.caches.kvcache.CacheMemory`)."""
        return self.kv.memory()


def qkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function (``attn_implementation="qkv"``): query [B, H, S_q, D];
    ``key``/``value`` the history, or a one-token step marked by a direct :class:`QKVLayer`, whose
    compressed history is attended to by :meth:`KVCache.attend`. Returns (out [B, S_q, H, D], None).
    A marked step with a mask (padding) reads the history back and takes transformers' SDPA."""
    layer = getattr(key, "qkv_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer.pending = False
    if attention_mask is not None or dropout:
        key, value = layer.layer.read()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # one new query per head, already appended: attending to every retained token is causal
    return layer.layer.attend(query, scale=scaling).transpose(1, 2), None


AttentionInterface.register(ATTENTION, qkv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def encoder_decoder_cache(policy: Policy | str | KVCache, **options) -> EncoderDecoderCache:
    """For encoder-decoder models (Whisper): compressed self-attention cache, plain cross-attention
    cache (the encoder's K/V are computed once and are not streamed)."""
    return EncoderDecoderCache(QKVCache(policy, **options), DynamicCache())
