"""qkv: composable 2-4 bit KV-cache compression (Quant VideoGen and the LLM baselines).

Importing qkv imports neither triton nor faiss and does not touch CUDA.

    import qkv
    policy = qkv.build_policy("qvg")
    ckv = policy.compress(k, v)              # k, v: [B, H, S, D]
    k_hat, v_hat = policy.decompress(ckv)
"""

from qkv import errors
from qkv.caches import (
    CompressedKV,
    CompressedTensor,
    Policy,
    TensorPolicy,
    build_policy,
    list_policies,
)

__version__ = "0.1.0"

__all__ = [
    "CompressedKV",
    "CompressedTensor",
    "Policy",
    "TensorPolicy",
    "build_policy",
    "errors",
    "list_policies",
]
