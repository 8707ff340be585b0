"""Policy composition, presets and compressed data."""

from qkv.caches.compressed import CompressedKV, CompressedTensor, StageData
from qkv.caches.policy import Policy, TensorPolicy
from qkv.caches.presets import OVERRIDES, PRESETS, build_policy, list_policies

__all__ = [
    "OVERRIDES",
    "PRESETS",
    "CompressedKV",
    "CompressedTensor",
    "Policy",
    "StageData",
    "TensorPolicy",
    "build_policy",
    "list_policies",
]
