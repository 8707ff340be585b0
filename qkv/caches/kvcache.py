"""The streaming compressed KV cache of a whole model: one :class:`LayerCache` per layer.

:class:`KVCache` holds the configuration (:class:`CacheConfig`: the policy, span lengths, sink,
windows, attention path, backend, checks) and one :class:`~qkv.caches.layer_cache.LayerCache` per
layer (the sink, the compressed spans and the full-precision tail of that layer: see
:mod:`qkv.caches.layer_cache`), created on first use unless ``num_layers`` is given. Beyond
forwarding appends, reads and attention to its layers it compresses the spans that several
layers' chunks complete in one pass (:meth:`KVCache.compress_ahead`), reports the exact stored
bytes of all layers (:meth:`KVCache.memory`), and saves and loads the whole state
(:mod:`qkv.caches.cache_io`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

from qkv.caches import cache_io
from qkv.caches.cache_config import CacheConfig, CacheMemory
from qkv.caches.layer_cache import LayerCache
from qkv.caches.policy import Policy
from qkv.caches.presets import build_policy
from qkv.component import check_int
from qkv.errors import CacheError, ConfigError, CorruptDataError, NonFiniteError, QKVError, ValueRangeError, shown
from qkv.io import load_device
from qkv.validation import check_kv_values_later

__all__ = ["KVCache"]

# KVCache's options besides the policy and num_layers
OPTIONS = tuple(f.name for f in dataclasses.fields(CacheConfig) if f.name != "policy")


class KVCache:
    """A streaming compressed KV cache: one :class:`LayerCache` per layer.

    ``policy``: a :class:`Policy` or a preset name / spec string (``qkv.build_policy``). Other
    arguments: see :class:`CacheConfig` and :mod:`qkv.caches.layer_cache`. ``num_layers=None``
    grows the layer list on first use of a layer index.

        cache = qkv.KVCache("qvg", span_chunks=8, sink_chunks=1)
        cache.append(layer, k_chunk, v_chunk)     # [B, H, S_chunk, D]
        k, v = cache.read(layer)                  # [B, H, S_retained, D]
        out = cache.attend(layer, q)              # q [B, H_q, S_q, D] -> [B, H_q, S_q, D]
        cache.memory().total                      # exact bytes
    """

    def __init__(self, policy: Policy | str, *, num_layers: int | None = None, **options) -> None:
        if isinstance(policy, str):
            policy = build_policy(policy)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"KVCache: unknown option(s) {shown(unknown)}; valid options: num_layers, {', '.join(OPTIONS)}"
            )
        self.config = CacheConfig(policy, **options)
        if num_layers is not None:
            check_int("cache", "num_layers", num_layers, 1)
        self.num_layers = num_layers
        self.layers: list[LayerCache] = [LayerCache(self.config, i) for i in range(num_layers or 0)]

    @property
    def policy(self) -> Policy:
        return self.config.policy

    def layer(self, index: int) -> LayerCache:
        """The cache of layer ``index`` (created on first use when ``num_layers`` is None)."""
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise CacheError(f"layer index must be an int >= 0, got {index!r}")
        if index >= len(self.layers):
            if self.num_layers is not None:
                raise CacheError(f"layer {index} outside this cache's {self.num_layers} layers")
            self.layers.extend(LayerCache(self.config, i) for i in range(len(self.layers), index + 1))
        return self.layers[index]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append a chunk [B, H, S_chunk, D] to ``layer`` (see :meth:`LayerCache.append`)."""
        self.layer(layer).append(k, v)

    def compress_ahead(self, chunks: Mapping[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Compress now, in one pass (:meth:`Policy.compress_many`), the span that appending
        ``chunks[i]`` (k, v) to layer ``i`` will make, for every layer where that chunk alone is one
        span (one-chunk spans, past the sink; see :meth:`LayerCache.ahead_request`); the next
        :meth:`append` (or :meth:`LayerCache.replace`) of that very chunk (the same tensors, unchanged) stores what was compressed
        here instead of compressing it, bit for bit the same span. For a pipeline that learns that
        every layer's chunk is final when its first layer moves on (Self-Forcing's clean pass): one
        pass per chunk instead of one per layer, and one read-back for the value checks (with
        ``validate``) instead of one per append. The result is held until that append (counted in
        ``memory().compressed``); a chunk appended changed, or another append first, drops it. Bad
        values compress nothing ahead: each append then raises for its own chunk."""
        requests = {}
        for index, (k, v) in chunks.items():
            request = self.layer(index).ahead_request(k, v)
            if request is not None:
                requests[index] = request
        if not requests:
            return
        cfg = self.config
        check = None
        if cfg.validate:  # every chunk's values in one reduction (an append re-checks none of them)
            named = [(f"layer {i}: {name}", t) for i in requests for name, t in zip("kv", chunks[i])]
            try:
                check = check_kv_values_later(named[0][0], named[0][1], *named[1:])
            except (NonFiniteError, ValueRangeError):
                return  # each append checks its own chunk and names the bad one
        done = cfg.span_policy.compress_many([chunks[i] for i in requests], warm_starts=[r[1] for r in requests.values()],
                                             backend=cfg.backend, validate=False, graphs=cfg.graphs)
        for j, ((index, (key, warm)), ckv) in enumerate(zip(requests.items(), done)):
            self.layers[index]._ahead = (key, warm, ckv, None if check is None else (check, (2 * j, 2 * j + 1)))

    def settle(self) -> None:
        """Wait for every layer's pending value checks (:meth:`LayerCache.settle`), raising the
        first failure."""
        for layer in self.layers:
            layer.settle()

    def _held(self, index: int, extra: object = None) -> LayerCache:
        """:meth:`layer` for reading: a layer never appended to (without ``extra`` to attend to)
        raises instead of creating every layer up to ``index``."""
        if isinstance(index, int) and index >= len(self.layers) and extra is None:
            raise CacheError(f"layer {shown(index)} holds nothing yet (the cache has {len(self.layers)} layers)")
        return self.layer(index)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Retained history of ``layer``: (k, v) [B, H, S, D]."""
        return self._held(layer).read()

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        *,
        extra: tuple[torch.Tensor, torch.Tensor] | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of q [B, H, Sq, D] to the history of ``layer`` (+ ``extra`` (k, v)):
        [B, H, Sq, D] (see :meth:`LayerCache.attend`)."""
        return self._held(layer, extra).attend(q, extra=extra, scale=scale)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append, then read (the transformers ``Cache.update`` contract)."""
        self.append(layer, k, v)
        return self.read(layer)

    def memory(self) -> CacheMemory:
        """Exact stored bytes, all layers together (``layer(i).memory()`` for one)."""
        total = CacheMemory()
        for layer in self.layers:
            total = total + layer.memory()
        return total

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def to(self, device: str | torch.device) -> "KVCache":
        """Move every layer to ``device`` (in place) and return this cache."""
        for layer in self.layers:
            layer.to(device)
        return self

    def state_dict(self) -> dict:
        """The whole state as plain data: ``config`` (:meth:`CacheConfig.to_dict`), ``num_layers``
        and each layer's :meth:`LayerCache.state_dict` (tensors shared, not copied)."""
        return {
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "layers": [layer.state_dict() for layer in self.layers],
        }

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        """Replace every layer's state by ``state`` (a :meth:`state_dict` of a cache configured
        alike, tensors on ``device``), after checking all of it; raises :class:`CorruptDataError`
        and leaves the cache unchanged if it does not add up."""
        if not isinstance(state, dict) or not isinstance(state.get("layers"), list):
            raise CorruptDataError("cache state: expected a dict with a list of layers")
        if state.get("config") != self.config.to_dict() or state.get("num_layers") != self.num_layers:
            raise CorruptDataError("cache state: saved from a cache configured otherwise than this one")
        layers = state["layers"]
        if self.num_layers is not None and len(layers) != self.num_layers:
            raise CorruptDataError(f"cache state: {len(layers)} layers, the cache has {self.num_layers}")
        fresh = [LayerCache(self.config, i) for i in range(len(layers))]
        for layer, data in zip(fresh, layers):
            layer.load_state_dict(data, device)
        self.layers = fresh

    def save(self, path: str | os.PathLike) -> None:
        """Write the whole state to the folder ``path`` (created; see :mod:`qkv.caches.cache_io`)."""
        cache_io.save_cache(path, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "KVCache":
        """Read a cache written by :meth:`save`; streaming resumes bit-exactly. Every file and every
        value in them is checked (:mod:`qkv.caches.cache_io`, :mod:`qkv.caches.layer_state`): a
        damaged, edited, incomplete or mixed-up save raises :class:`CorruptDataError`."""
        device = load_device(device)
        state = cache_io.load_cache(path, device)
        try:
            config = CacheConfig.from_dict(state["config"])
            options = {k: v for k, v in state["config"].items() if k != "policy"}
            cache = cls(config.policy, num_layers=state["num_layers"], **options)
        except (QKVError, TypeError) as exc:
            raise CorruptDataError(f"{shown(str(path))}: the stored cache config is invalid ({exc})") from None
        cache.load_state_dict(state, device)
        return cache

    def __repr__(self) -> str:
        mem = self.memory()
        return (
            f"KVCache({self.policy}, layers={len(self.layers)}, tokens={mem.tokens}, "
            f"bytes={mem.total:,}, bits/element={mem.bits_per_element:.3f})"
        )
