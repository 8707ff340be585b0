"""Policy composition, presets, compressed data and the streaming cache."""

from qkv.caches.cache_config import ATTENTION
from qkv.compressed import CompressedKV, CompressedTensor, StageData
from qkv.caches.cache_config import CacheConfig, CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
from qkv.caches.policy import Policy, TensorPolicy
from qkv.caches.presets import OVERRIDES, PRESETS, build_policy, list_policies

__all__ = [
    "ATTENTION",
    "OVERRIDES",
    "PRESETS",
    "CacheConfig",
    "CacheMemory",
    "CompressedKV",
    "CompressedTensor",
    "KVCache",
    "LayerCache",
    "Policy",
    "StageData",
    "TensorPolicy",
    "build_policy",
    "list_policies",
]
