"""Adapters that put a :class:`qkv.KVCache` into other libraries' model code.

Each lives in its own module and imports its library only when imported itself:

- :mod:`qkv.caches.adapters.transformers_cache`: a ``transformers`` ``Cache`` (5.x API);
- :mod:`qkv.caches.adapters.wan`: a ``diffusers`` attention processor for ``WanTransformer3DModel``
  and a chunk-wise (Self-Forcing style) rollout;
- :mod:`qkv.caches.adapters.self_forcing`: a drop-in for the Self-Forcing code's per-block
  ``{"k", "v", "global_end_index", "local_end_index"}`` cache dicts.
"""
