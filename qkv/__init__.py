"""qkv: composable 2-4 bit KV-cache compression (Quant VideoGen and the LLM baselines).

Importing qkv imports neither triton nor faiss and does not touch CUDA.

    import qkv
    policy = qkv.build_policy("qvg")
    ckv = policy.compress(k, v)              # k, v: [B, H, S, D]
    k_hat, v_hat = policy.decompress(ckv)
    policy.error_bound(ckv, k_hat, v_hat).check(k, v, k_hat, v_hat)  # guaranteed bounds (qkv.bounds)

    cache = qkv.KVCache("qvg", span_chunks=8)  # streaming: append chunks, spans compressed once
    cache.append(layer, k_chunk, v_chunk)      # [B, H, S_chunk, D]
    k_all, v_all = cache.read(layer)
"""

from qkv import errors
from qkv.bounds import Bound, BoundKind, KVBound
from qkv.caches import (
    CompressedKV,
    CompressedTensor,
    KVCache,
    Policy,
    TensorPolicy,
    build_policy,
    list_policies,
)

__version__ = "0.1.0"

__all__ = [
    "Bound",
    "BoundKind",
    "CompressedKV",
    "CompressedTensor",
    "KVBound",
    "KVCache",
    "Policy",
    "TensorPolicy",
    "build_policy",
    "errors",
    "list_policies",
]
