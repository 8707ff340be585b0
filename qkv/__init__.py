"""qkv: composable 2-4 bit KV-cache compression (Quant VideoGen and the LLM baselines).

Importing qkv imports neither triton nor faiss and does not touch CUDA; the names below are
loaded on first use, so ``import qkv.format`` (or any lower layer) loads only what it needs.

    import qkv
    policy = qkv.build_policy("qvg")
    ckv = policy.compress(k, v)              # k, v: [B, H, S, D]
    k_hat, v_hat = policy.decompress(ckv)
    policy.error_bound(ckv, k_hat, v_hat).check(k, v, k_hat, v_hat)  # guaranteed bounds (qkv.bounds)

    cache = qkv.KVCache("qvg", span_chunks=8)  # streaming: append chunks, spans compressed once
    cache.append(layer, k_chunk, v_chunk)      # [B, H, S_chunk, D]
    k_all, v_all = cache.read(layer)
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Bound": "qkv.bounds",
    "BoundKind": "qkv.bounds",
    "KVBound": "qkv.bounds",
    "CompressedKV": "qkv.compressed",
    "CompressedTensor": "qkv.compressed",
    "KVCache": "qkv.caches.kvcache",
    "Policy": "qkv.caches.policy",
    "TensorPolicy": "qkv.caches.policy",
    "build_policy": "qkv.caches.presets",
    "list_policies": "qkv.caches.presets",
}
_SUBMODULES = ("bounds", "caches", "compressed", "errors", "format", "io", "kernels", "quantizers", "grouping", "spec")

__all__ = sorted([*_EXPORTS, "errors"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name == "adapters":  # qkv.adapters.<client>: the pipeline adapters, loaded on first use
        value = importlib.import_module("qkv.caches.adapters")
    elif name in _SUBMODULES:
        value = importlib.import_module(f"qkv.{name}")
    else:
        raise AttributeError(f"module 'qkv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES, "adapters"})
