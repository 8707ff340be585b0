"""A ``transformers`` Cache (``cache_utils`` API of transformers >= 5.24, < 6) backed by a :class:`qkv.KVCache`.

    from qkv.caches.adapters.transformers_cache import QKVCache, encoder_decoder_cache
    cache = QKVCache("qvg-int4", span_tokens=32)
    out = model.generate(**inputs, cache=cache)                                 # decoder-only
    out = whisper.generate(features, cache=encoder_decoder_cache("rtn", span_tokens=32))

Each model layer gets a :class:`QKVLayer` around the cache's :class:`LayerCache`: ``update(k, v)``
appends the step's K/V ``[B, H, S_new, D]`` as one chunk and returns the retained history (spans
decompressed one by one, nothing decompressed kept). Spans are compressed once, when complete, and
never re-quantized; the fp tail holds the newest tokens (a policy's ``window`` stays there:
KIVI's residual, see :mod:`qkv.caches.layer_cache`).

**Sliding windows.** ``QKVCache(policy, config=model.config)`` reads the model's layer types as
transformers' ``DynamicCache(config=...)`` does: a ``"sliding_attention"`` (or
``"chunked_attention"``) layer becomes a :class:`QKVSlidingLayer`, which hands each step the newest
``window - 1`` tokens and its own and then evicts every older token (a compressed span the window
cuts drops the evicted tokens from its data where its format can), so its memory is bounded by the
window; full-attention layers keep everything.

``get_seq_length()`` counts every token ever appended (positions stay absolute when a sink and a
sliding window evict tokens); ``get_mask_sizes`` gives the retained length with the matching offset,
which is exact for causal attention without padding (on a sliding layer, what transformers'
``DynamicSlidingWindowLayer`` gives). ``crop`` drops the newest tokens from the
full-precision tail (assisted decoding's rejected candidates; compressed spans are never rolled
back, so keep ``recent_chunks=1``); beam search reorders batch rows of the compressed data directly.

**Attending to the compressed spans directly.** Importing this module registers the attention
function :func:`qkv_attention` as ``attn_implementation="qkv"`` (transformers 5.x
``AttentionInterface``). With it and ``QKVCache(..., direct=True)``, a one-token step appends its
K/V and hands the model the layer itself (:class:`QKVLayer` marks the step's tensors), and
:func:`qkv_attention` calls :meth:`KVCache.attend` (the decode kernel on a GPU): the history is
never decompressed per token; a sliding layer holds no more than its window, so its mask (which
transformers builds once the window is full) hides nothing from the new token and is only read
once per forward. Steps of several tokens (the prompt, assisted decoding's candidates) and masks
that hide keys (padding, a chunk boundary) get the decompressed history and transformers' SDPA, as
without it::

    model.set_attn_implementation("qkv")
    out = model.generate(**inputs, cache=QKVCache("kivi", direct=True))
"""

from __future__ import annotations

import warnings

import torch
from transformers import AttentionInterface
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    EncoderDecoderCache,
    get_layer_types_and_kwargs,
)
from transformers.configuration_utils import PreTrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
from qkv.caches.policy import Policy
from qkv.errors import CacheError

__all__ = ["ATTENTION", "QKVCache", "QKVLayer", "QKVSlidingLayer", "encoder_decoder_cache", "qkv_attention"]

# the attn_implementation name under which qkv_attention is registered
ATTENTION = "qkv"
# a model config's layer types (transformers' get_layer_types_and_kwargs) a QKVCache can hold:
# full attention, and the windows transformers' cache keeps as DynamicSlidingWindowLayer
FULL, WINDOWED = ("full_attention",), ("sliding_attention", "chunked_attention")


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
        """Append ``key_states``/``value_states`` [B, H, S_new, D]; return the history the step's
        queries attend to [B, H, S, D], or with ``direct`` and one new token the step's own
        tensors marked with this layer (for :func:`qkv_attention`, which attends to the compressed
        history itself)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise CacheError(
                f"QKVCache(direct=True) needs the model to attend through qkv's attention: "
                f"model.set_attn_implementation({ATTENTION!r})"
            )
        self.layer.append(key_states, value_states)
        new = key_states.shape[2]
        visible = self.visible(new)
        if self.direct and new == 1 and (visible is None or self.layer.tokens <= visible):
            if key_states.requires_grad or value_states.requires_grad:  # not the model's autograd graph
                key_states, value_states = key_states.detach(), value_states.detach()
            key_states.qkv_layer = self
            self.pending = True
            return key_states, value_states
        history = self.history(new)
        self.attended()
        return history

    def visible(self, new: int) -> int | None:
        """How many of the newest retained tokens a step of ``new`` tokens attends to (None: all)."""
        return None

    def history(self, new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The retained tokens a step of ``new`` tokens attends to, decompressed: (k, v) [B, H, S, D]."""
        k, v = self.layer.read()
        visible = self.visible(new)
        if visible is not None and k.shape[2] > visible:
            k, v = k[:, :, -visible:], v[:, :, -visible:]
        return k, v

    def attended(self) -> None:
        """The step's attention has read the layer (a full-attention layer keeps every token)."""

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


class QKVSlidingLayer(QKVLayer):
    """A sliding-window layer (``"sliding_attention"``, or ``"chunked_attention"``, which
    transformers' cache keeps alike) of :class:`QKVCache`: as transformers'
    ``DynamicSlidingWindowLayer``, a step attends to the newest ``window - 1`` tokens before it and
    to its own, and after it the layer evicts every token older than the newest ``window - 1``
    (:meth:`LayerCache.evict`: a span cut by the window drops the evicted tokens from its data
    where its format can). ``activate_past_recording`` (assisted decoding) keeps the tokens until
    the next ``crop``, which can roll them back."""

    is_sliding = True

    def __init__(self, layer: LayerCache, window: int, direct: bool = False) -> None:
        super().__init__(layer, direct)
        self.window = window
        self.record_past = False
        layer.bound_to(window)  # the newest window - 1 tokens after a step, and the next one

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Keep evicted tokens until the next ``crop`` (assisted decoding). ``Cache`` passes its
        arguments to every layer (transformers >= 5.25); ``recurrent_states_to_keep`` is for
        recurrent (linear-attention) layers and has nothing to act on here."""
        self.record_past = True

    def visible(self, new: int) -> int:
        return self.window - 1 + new

    def attended(self) -> None:
        if not self.record_past:
            self.slide()

    def slide(self) -> None:
        """Evict every retained token older than the newest ``window - 1``."""
        excess = self.layer.tokens - (self.window - 1)
        if excess > 0:
            self.layer.evict(excess)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = min(self.layer.tokens, self.window - 1)
        return kept + query_length, self.layer.seen - kept

    def get_max_length(self) -> int:
        return self.window

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens as :meth:`QKVLayer.crop` does, then evict what the window no
        longer holds (``crop(0)`` only evicts). A crop that would need tokens already evicted
        raises :class:`CacheError` (call ``activate_past_recording`` before the steps to undo)."""
        if not self.is_initialized:
            return
        drop = -tokens_to_remove if tokens_to_remove <= 0 else self.layer.seen - tokens_to_remove
        needed = min(self.window - 1, self.layer.seen - drop)
        if self.layer.tokens - drop < needed:
            raise CacheError(
                f"layer {self.layer.index}: cropping {drop} tokens needs {needed - self.layer.tokens + drop} "
                f"that the sliding window of {self.window} already evicted (activate_past_recording first)"
            )
        super().crop(tokens_to_remove)
        self.slide()


class QKVCache(Cache):
    """A ``transformers.Cache`` whose layers compress with ``policy`` (a :class:`Policy`, preset
    name or spec) through a :class:`KVCache`; ``options`` go to :class:`KVCache` (e.g.
    ``span_tokens=32``, ``sink_chunks=1``, ``max_spans=8``). Pass an existing ``KVCache`` as
    ``policy`` to wrap it.

    ``config``: the model's config. Its layer types (``layer_types``, or a ``sliding_window``
    for every layer) make each sliding-window layer a :class:`QKVSlidingLayer`, which keeps only
    what the model's window attends to, as transformers' ``DynamicCache(config=...)`` does.
    Without it every layer keeps every token (the model's masks still apply the windows, so the
    outputs are the same, and the memory is not bounded). Other layer types (linear attention,
    shared K/V, ...) raise :class:`CacheError`, as does ``sink_chunks`` with sliding layers (a
    window drops the first tokens too). Without ``config`` layers are created as the model first
    uses them.

    ``direct=True`` also makes the cache with ``attend_graphs=True`` unless ``options`` say
    otherwise: on a GPU each layer's one-token attention is replayed from a CUDA graph while only
    its tail grows (:mod:`qkv.caches.attend_graphs`), which the model can take because it reads each
    step's output before the layer attends again."""

    def __init__(
        self, policy: Policy | str | KVCache, *, config: PreTrainedConfig | None = None, direct: bool = False, **options
    ) -> None:
        if isinstance(policy, KVCache):
            if options:
                raise CacheError("options apply to a new KVCache, not to an existing one")
            self.kv = policy
        else:
            if direct:  # the model consumes each step's attention output before that layer's next step
                options.setdefault("attend_graphs", True)
            self.kv = KVCache(policy, **options)
        self.direct = direct
        if config is None:
            layers = [QKVLayer(layer, direct) for layer in self.kv.layers]
        else:
            layers = [self._layer(i, *kind) for i, kind in enumerate(zip(*get_layer_types_and_kwargs(
                config.get_text_config(decoder=True))))]
        super().__init__(layers=layers)

    def _layer(self, index: int, layer_type: str, kwargs: dict) -> QKVLayer:
        """The layer for model layer ``index`` of ``layer_type`` (transformers' name)."""
        if layer_type in FULL:
            return QKVLayer(self.kv.layer(index), self.direct)
        if layer_type not in WINDOWED:
            raise CacheError(
                f"QKVCache: layer {index} is {layer_type!r}; supported layer types: {', '.join(FULL + WINDOWED)}"
            )
        if self.kv.config.sink_chunks:
            raise CacheError(
                f"QKVCache: layer {index} is {layer_type!r} and drops every token older than its window, the "
                f"first ones too: sink_chunks={self.kv.config.sink_chunks} cannot be kept there (use sink_chunks=0)"
            )
        return QKVSlidingLayer(self.kv.layer(index), kwargs["sliding_window"], self.direct)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(QKVLayer(self.kv.layer(len(self.layers)), self.direct))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def memory(self):
        """Exact stored bytes (:class:`qkv.caches.cache_config.CacheMemory`)."""
        return self.kv.memory()


def _unrestricted(mask: torch.Tensor) -> bool:
    """Whether a boolean mask lets every query see every key: a sliding layer's mask once its
    window is full (transformers builds it from then on) masks nothing for one query when the
    layer holds no more than the window. Read once per mask (the layers of a forward share it)."""
    if mask.dtype != torch.bool:
        return False
    seen = getattr(mask, "qkv_unrestricted", None)
    if seen is None:
        seen = mask.qkv_unrestricted = bool(mask.all())
    return seen


def qkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function (``attn_implementation="qkv"``): query [B, H, S_q, D];
    ``key``/``value`` the history, or a one-token step marked by a direct :class:`QKVLayer`, whose
    compressed history is attended to by :meth:`KVCache.attend`. Returns (out [B, S_q, H, D], None).
    A marked step with a mask that hides a key (padding) reads the history back and takes
    transformers' SDPA."""
    layer = getattr(key, "qkv_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layer.pending = False
    window = kwargs.get("sliding_window")
    if isinstance(window, int) and not layer.is_sliding:
        warnings.warn(
            f"the model attends over a sliding window of {window} tokens, but its QKVCache keeps every token (the "
            "outputs are the same, the memory is not bounded): make it with QKVCache(..., config=model.config)",
            stacklevel=2)
    if dropout or (attention_mask is not None and not _unrestricted(attention_mask)):
        key, value = layer.history(1)
        out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
    else:
        # one new query per head, already appended: attending to every retained token is causal
        # (and, on a sliding layer that holds no more than its window, inside the window)
        out = layer.layer.attend(query, scale=scaling).transpose(1, 2), None
    layer.attended()
    return out


AttentionInterface.register(ATTENTION, qkv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def encoder_decoder_cache(policy: Policy | str | KVCache, **options) -> EncoderDecoderCache:
    """For encoder-decoder models (Whisper): compressed self-attention cache, plain cross-attention
    cache (the encoder's K/V are computed once and are not streamed)."""
    return EncoderDecoderCache(QKVCache(policy, **options), DynamicCache())
