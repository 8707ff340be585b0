"""Adapters that put a :class:`qkv.KVCache` into other libraries' model code.

Each lives in its own module and imports its library only when imported itself:

- :mod:`qkv.caches.adapters.transformers_cache`: a ``transformers`` ``Cache`` (5.x API);
- :mod:`qkv.caches.adapters.wan`: a ``diffusers`` attention processor for ``WanTransformer3DModel``
  and a chunk-wise (Self-Forcing style) rollout;
- :mod:`qkv.caches.adapters.self_forcing`: a drop-in for the Self-Forcing code's per-block
  ``{"k", "v", "global_end_index", "local_end_index"}`` cache dicts (the GitHub layout), whose
  dicts themselves are :mod:`qkv.caches.adapters.self_forcing_blocks`;
- :mod:`qkv.caches.adapters.streamdiffusionv2`: streamdiffusionv2's causal Wan (Self-Forcing /
  CausVid);
- :mod:`qkv.caches.adapters.anyflow_far`: diffusers' AnyFlow-FAR (frame-autoregressive Wan);
- :mod:`qkv.caches.adapters.sana_wm`: diffusers' SANA-WM refiner (sink + recent history);
- :mod:`qkv.caches.adapters.flashdreams`: flashdreams' streaming Wan (its ``BlockKVCache``);
- :mod:`qkv.caches.adapters.longcat_video`: LongCat-Video's condition-frame cache (``kv_cache_dict``);
- :mod:`qkv.caches.adapters.hy_worldplay`: HY-WorldPlay's retrieved-memory vision cache (each frame
  compressed once, in a store keyed by frame index).

:mod:`qkv.caches.adapters.context_parallel`: what the Wan processor exchanges under diffusers'
context parallelism (each rank caches its heads or its token shard), and the refusal of the
adapters of models diffusers has no plan for. Pipeline adapters share one shape
(:mod:`qkv.caches.adapters.handle`): ``install(...)`` returns a handle with ``memory()``,
``reset()`` and ``remove()``. ``qkv.adapters.<client>`` names these
modules (loaded on first use; ``import qkv`` loads none of them).
"""

import importlib

# client name -> module, for ``qkv.adapters.<client>``
CLIENTS = {
    name: f"qkv.caches.adapters.{name}"
    for name in ("self_forcing", "streamdiffusionv2", "anyflow_far", "sana_wm", "flashdreams", "longcat_video",
                 "hy_worldplay")
}


def __getattr__(name: str):
    if name not in CLIENTS:
        raise AttributeError(f"module 'qkv.adapters' has no attribute {name!r}; clients: {', '.join(CLIENTS)}")
    return importlib.import_module(CLIENTS[name])
