"""What a :class:`qkv.KVCache` is configured with, and what it reports about its memory."""

from __future__ import annotations

import dataclasses
import functools

from qkv.caches.encode_graphs import EncodeGraphs
from qkv.caches.policy import Policy
from qkv.caches.presets import build_policy
from qkv.component import check_choice, check_int
from qkv.errors import ConfigError
from qkv.grouping import ClusteringGrouper
from qkv.kernels import Backend

__all__ = ["ATTENTION", "CacheConfig", "CacheMemory"]

# how KVCache.attend reads the history (docs/attention.md compares them)
ATTENTION = {
    "auto": "the fastest correct path for the call (qkv.kernels.choose_method): decode for up to 64 "
    "queries per head, staged for more on a GPU",
    "decode": "flash-decoding over the compressed spans (qkv.kernels.triton.decode): keys split across "
    "programs, each tile decoded once per KV head; no decompressed K/V in memory",
    "fused": "the Triton kernel reads the compressed spans directly (qkv.kernels.attention): no "
    "decompressed K/V in memory",
    "staged": "one span at a time is decompressed and attended to by torch's fused attention, merged by "
    "log-sum-exp (qkv.kernels.attention_staged): one decompressed span in memory",
    "read": "the whole history is decompressed (read()) and attended to by scaled_dot_product_attention",
}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """How a :class:`KVCache` streams. A span is ``span_chunks`` chunks (8 when neither is given,
    as in the paper) or ``span_tokens`` tokens; not both. The sink is the first ``sink_chunks``
    chunks or the first ``sink_tokens`` tokens (a chunk that crosses it is cut there: a sink of
    frames with chunks of several frames); not both. ``attention``: how :meth:`KVCache.attend`
    reads the history, one of :data:`ATTENTION` (see docs/attention.md). ``encode_graphs``:
    replay span encodes that draw nothing (warm-started, or without k-means) from CUDA graphs
    (:mod:`qkv.caches.encode_graphs`: fewer host launches; k-means then runs all its iterations,
    and each span shape keeps its encode's working memory). ``attend_graphs``: replay a layer's
    few-query :meth:`KVCache.attend` from a CUDA graph while only its tail grows
    (:mod:`qkv.caches.attend_graphs`: token-by-token decoding without the decode path's host
    work; each layer keeps its graph's partials and output)."""

    policy: Policy
    span_chunks: int | None = None
    span_tokens: int | None = None
    sink_chunks: int = 0
    sink_tokens: int = 0
    recent_chunks: int = 0
    max_spans: int | None = None
    warm_start: bool = True
    validate: bool = True
    backend: str = "auto"
    attention: str = "auto"
    encode_graphs: bool = False
    attend_graphs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Policy):
            raise ConfigError(f"cache: policy must be a qkv Policy, got {type(self.policy).__name__}")
        if self.span_chunks is None and self.span_tokens is None:
            object.__setattr__(self, "span_chunks", 8)
        if self.span_chunks is not None and self.span_tokens is not None:
            raise ConfigError("cache: set span_chunks or span_tokens, not both")
        if self.span_chunks is not None:
            check_int("cache", "span_chunks", self.span_chunks, 1)
        if self.span_tokens is not None:
            check_int("cache", "span_tokens", self.span_tokens, 1)
        check_int("cache", "sink_chunks", self.sink_chunks, 0)
        check_int("cache", "sink_tokens", self.sink_tokens, 0)
        if self.sink_chunks and self.sink_tokens:
            raise ConfigError("cache: set sink_chunks or sink_tokens, not both")
        check_int("cache", "recent_chunks", self.recent_chunks, 0)
        if self.max_spans is not None:
            check_int("cache", "max_spans", self.max_spans, 1)
        for key in ("warm_start", "validate", "encode_graphs", "attend_graphs"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"cache: {key} must be True or False, got {getattr(self, key)!r}")
        check_choice("cache", "backend", self.backend, tuple(b.value for b in Backend))
        check_choice("cache", "attention", self.attention, tuple(ATTENTION))

    @functools.cached_property
    def span_policy(self) -> Policy:
        """The policy spans are compressed with: ``policy`` with its windows stripped."""
        p = self.policy
        return Policy(dataclasses.replace(p.k, window=0), dataclasses.replace(p.v, window=0), name=p.name)

    @functools.cached_property
    def graphs(self) -> EncodeGraphs | None:
        """The captured span encodes of the cache made with this config (``encode_graphs``), or None."""
        return EncodeGraphs() if self.encode_graphs else None

    @functools.cached_property  # read at every append: the policy's formats are not rebuilt each time
    def fp_window(self) -> int:
        """Newest tokens that always stay in full precision (the policy's window)."""
        return max(self.policy.k.window, self.policy.v.window)

    @functools.cached_property
    def residual_group(self) -> int | None:
        """For a policy with a window whose compression is local along the tokens
        (:attr:`Policy.token_group` is not None): the group in which tokens leaving the window are
        compressed, as soon as one is complete (KIVI's residual); None otherwise (spans are
        compressed whole, once complete, with at least the window after them)."""
        return self.policy.token_group if self.fp_window else None

    @property
    def clusters(self) -> bool:
        """Whether K or V compression runs a seeded clustering (k-means, FAISS)."""
        return any(
            tp.smoothing.needs_groups and isinstance(tp.grouping, ClusteringGrouper) for tp in (self.policy.k, self.policy.v)
        )

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["policy"] = self.policy.spec
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CacheConfig":
        return cls(**{**data, "policy": build_policy(data["policy"])})


@dataclasses.dataclass(frozen=True)
class CacheMemory:
    """Exact bytes a cache (or one layer) stores, by part.

    compressed: every stored span (all its components, including full-precision tokens a policy
        keeps inside a span); sink / tail: the full-precision first and newest chunks; warm_start:
        centroids kept for the next span's warm start that no stored span shares.
    tokens: retained tokens (summed over layers); elements: K and V values they represent.
    reserved: the free room of the tail buffers (allocated, holding no token: the next chunks are
        written there, see :mod:`qkv.caches.tail`); not part of ``total``, part of ``allocated``.
    dead_tokens: evicted tokens still stored inside a span (those its format cannot drop: fewer
        than a per-channel block, or groups implied by a block grid); their bytes are part of
        ``compressed``, they are not part of ``tokens``.
    """

    compressed: int = 0
    sink: int = 0
    tail: int = 0
    warm_start: int = 0
    tokens: int = 0
    elements: int = 0
    reserved: int = 0
    dead_tokens: int = 0

    @property
    def full_precision(self) -> int:
        return self.sink + self.tail

    @property
    def total(self) -> int:
        return self.compressed + self.sink + self.tail + self.warm_start

    @property
    def allocated(self) -> int:
        """Bytes the cache holds on its device: what it stores and the tail buffers' free room."""
        return self.total + self.reserved

    @property
    def bits_per_element(self) -> float:
        """Stored bits per retained K/V value (16 for an uncompressed bf16 cache)."""
        return 8 * self.total / self.elements if self.elements else 0.0

    def __add__(self, other: "CacheMemory") -> "CacheMemory":
        return CacheMemory(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))
