"""What every pipeline adapter's ``install`` returns: the cache, its memory, and a way back.

Every client adapter (``qkv.adapters.<client>``) has the same entry point::

    handle = qkv.adapters.<client>.install(model_or_pipeline, "qvg", **cache_options)
    ...                                  # the client's own code runs unchanged
    handle.memory()                      # exact bytes held for K/V (CacheMemory)
    handle.remove()                      # the model is exactly as before install

``install`` patches attributes of the client's objects (a module's ``forward``, a pipeline's
cache allocator) on the instances only; :class:`Patches` records each old value (or its absence)
and puts it back on :meth:`AdapterHandle.remove`, newest first.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qkv import kernels
from qkv.caches.adapters.context_parallel import ContextParallel
from qkv.caches.cache_config import CacheConfig, CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
from qkv.caches.policy import Policy
from qkv.errors import CacheError, ConfigError

__all__ = ["AdapterHandle", "HostValue", "Patches", "attend_parts", "pending_memory"]

_ABSENT = object()


def diffusers_transformer(target, class_name: str, client: str):
    """The transformer ``target`` is or holds (a diffusers pipeline's ``.transformer``), which must
    be a ``class_name``; else :class:`ConfigError` naming the client."""
    model = getattr(target, "transformer", target)
    if type(model).__name__ != class_name:
        raise ConfigError(f"{client}: expected a {class_name} or a pipeline holding one, got {type(model).__name__}")
    return model


class Patches:
    """Instance attributes set by an adapter, each restorable to what it was."""

    def __init__(self) -> None:
        self._undo: list[tuple[object, str, object]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        """``obj.name = value`` (on the instance; ``__class__`` swaps the instance's class),
        remembering the old instance attribute (or class)."""
        self._undo.append((obj, name, type(obj) if name == "__class__" else vars(obj).get(name, _ABSENT)))
        setattr(obj, name, value)

    def undo(self) -> None:
        """Restore every attribute, newest first."""
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def attend_parts(
    config: CacheConfig, q: torch.Tensor, parts: list, parallel: ContextParallel | None = None
) -> torch.Tensor:
    """Attention of ``q`` [B, H, Sq, D] to the keys of ``parts`` together: each a
    :class:`LayerCache` (its retained history; skipped while empty) or a dense ``(k, v)``
    [B, H_kv, S, D] pair. ``config.attention`` picks how, as in :meth:`LayerCache.attend`:
    ``"staged"`` a group of spans decompressed at a time, ``"read"`` every layer decompressed
    (``read()``) for ``scaled_dot_product_attention``, otherwise the compressed spans read
    directly (:func:`qkv.kernels.attention`). With a ring (``parallel``: the parts hold this
    rank's keys) every ring rank's queries attend to them as in the staged path and the partial
    results are merged (:meth:`ContextParallel.attend`). Returns [B, H, Sq, D] in q's dtype."""
    layers = [p for p in parts if not isinstance(p, LayerCache) or p.layout is not None]
    if config.attention == "read" and not (parallel and parallel.ring):
        kv = [p.read() if isinstance(p, LayerCache) else p for p in layers]
        k, v = (torch.cat([x[i].to(q.dtype) for x in kv], 2) for i in (0, 1))
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    segments = []
    for p in layers:  # a layer's spans as its plan: its kernels' tables are built once, not per call
        segments.extend(p.attention_segments() if isinstance(p, LayerCache) else [kernels.DenseKV(*p)])
    if parallel and parallel.ring:
        return parallel.attend(q, lambda qs: kernels.attention_partial(qs, segments, backend=config.backend),
                               backend=config.backend)
    attend = kernels.attention_staged if config.attention == "staged" else kernels.attention
    return attend(q, segments, backend=config.backend)


class HostValue:
    """The host value of a small tensor the client keeps on its device (a position, an end index),
    read once and remembered until the tensor changes: another tensor, or its version counter moved
    (written in place). A read per block would stall the host on the GPU at every block, where
    upstream passes one tensor to all of them."""

    def __init__(self) -> None:
        self.memo: tuple[weakref.ref, int, object] | None = None

    def read(self, tensor: torch.Tensor, convert: Callable[[torch.Tensor], object]) -> object:
        """``convert(tensor)`` (the read), or the remembered value if ``tensor`` is unchanged."""
        memo = self.memo
        if memo is not None and memo[0]() is tensor and memo[1] == tensor._version:
            return memo[2]
        value = convert(tensor)
        self.wrote(tensor, value)
        return value

    def wrote(self, tensor: torch.Tensor, value: object) -> None:
        """Remember that ``tensor`` holds ``value`` now (after writing it: no read needed)."""
        self.memo = (weakref.ref(tensor), tensor._version, value)


def pending_memory(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> CacheMemory:
    """The full-precision chunks an adapter holds outside the cache (the chunk being denoised,
    k and v [B, H, S, D] each) as a :class:`CacheMemory` (counted as tail)."""
    total = CacheMemory()
    for k, v in chunks:
        b, h, s, d = k.shape
        total = total + CacheMemory(tail=2 * k.numel() * k.element_size(), tokens=s, elements=2 * b * h * s * d)
    return total


class AdapterHandle:
    """An installed adapter: ``cache`` (the :class:`KVCache`, None until the first forward when
    the client's chunk size decides its sink), :meth:`memory`, :meth:`reset`, :meth:`remove`; a
    context manager that removes itself on exit."""

    def __init__(self, client: str, policy: Policy | str, cache_options: dict, *, fixed: tuple[str, ...] = ()) -> None:
        clash = sorted(set(cache_options) & set(fixed))
        if clash:
            raise ConfigError(f"{client}: {', '.join(clash)} follow(s) from the client's own cache (its layers, "
                              "window and sink); do not pass them")
        self.client = client
        self.policy = policy
        self.cache_options = dict(cache_options)
        self.cache: KVCache | None = None
        self.patches = Patches()
        self.removed = False

    def build_cache(self, num_layers: int, **derived) -> KVCache:
        """The :class:`KVCache` (created once, with the options the client's settings fix)."""
        if self.cache is None:
            self.cache = KVCache(self.policy, num_layers=num_layers, **self.cache_options, **derived)
        return self.cache

    def check_installed(self) -> None:
        if self.removed:
            raise CacheError(f"{self.client}: this adapter was removed")

    def caches(self) -> list[KVCache]:
        """Every :class:`KVCache` this adapter holds (built so far)."""
        return [self.cache] if self.cache is not None else []

    def memory(self) -> CacheMemory:
        """Exact K/V bytes held: the caches (all layers) plus the full-precision chunk each layer
        holds while it is being denoised (what a bf16 cache would hold in its slots too)."""
        held = CacheMemory()
        for cache in self.caches():
            held = held + cache.memory()
        return held + pending_memory(self.pending())

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The full-precision (k, v) [B, H, S, D] held outside the caches (none by default)."""
        return []

    def reset(self) -> None:
        """Forget the cached video (the next forward starts a new one)."""
        for cache in self.caches():
            cache.reset()

    def remove(self) -> None:
        """Put the client's objects back as they were; the caches are emptied and dropped."""
        if not self.removed:
            self.patches.undo()
            self.reset()
            self.removed = True
            self.cache = None

    def __enter__(self) -> "AdapterHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else repr(self.cache)
        return f"{type(self).__name__}({self.client}, {state})"
