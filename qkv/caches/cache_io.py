"""Saving and restoring a :class:`KVCache` mid-stream (safetensors, no pickle).

A saved cache is a folder:

- ``cache.safetensors``: every full-precision chunk (``L<i>.sink<j>.k`` ...), warm-start centroids
  that no stored span shares, and in the metadata the cache config (policy spec included), each
  layer's counters and chunk positions, and a SHA-256 over all of it;
- ``L<i>.S<j>.safetensors``: stored span j of layer i, written by :meth:`CompressedKV.save` (its
  own checksum and layout check on load).

Loading rebuilds the identical state, so appending the same chunks afterwards gives bit-identical
reads and spans (k-means is seeded and deterministic). Damaged or mismatched files raise
:class:`CorruptDataError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qkv.compressed import CompressedKV, CompressedTensor, StageData
from qkv.caches.cache_config import CacheConfig
from qkv.caches.kvcache import Chunk, KVCache, LayerCache, Span, centroids_only
from qkv.dtypes import INPUT_DTYPES
from qkv.errors import CorruptDataError, QKVError
from qkv.format import TensorFormat

FORMAT = "qkv.kvcache"
VERSION = "2"
STATE = "cache.safetensors"
_DTYPES = {str(d): d for d in INPUT_DTYPES}


def _digest(tensors: dict[str, torch.Tensor], meta: str) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(meta.encode())
    return h.hexdigest()


def _warm_state(layer: LayerCache, prefix: str, tensors: dict[str, torch.Tensor]) -> dict | None:
    warm = layer.warm
    if warm is None:
        return None
    if layer.warm_shares_newest_span():
        return {"from": "last_span"}
    headers = {}
    for name, ct in (("k", warm.k), ("v", warm.v)):
        headers[name] = {"shape": list(ct.shape), "dtype": str(ct.dtype), "quantized_tokens": ct.quantized_tokens,
                         "stages": len(ct.stages), "format": ct.format.to_dict()}
        for t, stage in enumerate(ct.stages):
            tensors[f"{prefix}.warm.{name}.stage{t}"] = stage.centroids.detach().contiguous().cpu()
    return {"from": "tensors", "spec": warm.spec, **headers}


def save_cache(cache: KVCache, path: str | os.PathLike) -> None:
    """Write ``cache`` into the folder ``path`` (created; older span files there are removed)."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers, files = [], set()
    for i, layer in enumerate(cache.layers):
        entry = {"seen": layer.seen, "chunks_seen": layer.chunks_seen, "evicted": layer.evicted, "layout": None,
                 "sink": [], "tail": [], "spans": []}
        if layer.layout is not None:
            b, h, d, dtype, _ = layer.layout
            entry["layout"] = [b, h, d, str(dtype)]
        for part in ("sink", "tail"):
            for j, c in enumerate(getattr(layer, part)):
                # copies: tail chunks are views of one buffer (safetensors refuses shared storage)
                tensors[f"L{i}.{part}{j}.k"] = c.k.detach().to("cpu", copy=True).contiguous()
                tensors[f"L{i}.{part}{j}.v"] = c.v.detach().to("cpu", copy=True).contiguous()
                entry[part].append(c.start)
        for j, sp in enumerate(layer.spans):
            name = f"L{i}.S{j}.safetensors"
            sp.ckv.save(folder / name)
            files.add(name)
            entry["spans"].append({"file": name, "start": sp.start, "skip": sp.skip})
        entry["warm"] = _warm_state(layer, f"L{i}", tensors)
        layers.append(entry)
    meta = json.dumps({"config": cache.config.to_dict(), "num_layers": cache.num_layers, "layers": layers})
    save_file(tensors, os.fspath(folder / STATE),
              metadata={"format": FORMAT, "version": VERSION, "state": meta, "sha256": _digest(tensors, meta)})
    for stale in folder.glob("L*.S*.safetensors"):
        if stale.name not in files:
            stale.unlink()


def _read_state(folder: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    where = folder / STATE
    try:
        with safe_open(os.fspath(where), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(os.fspath(where))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CorruptDataError(f"{where}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CorruptDataError(f"{where}: not a qkv cache of version {VERSION} (format={meta.get('format')!r})")
    if meta.get("sha256") != _digest(tensors, meta.get("state", "")):
        raise CorruptDataError(f"{where}: checksum mismatch: the file was modified or damaged")
    return tensors, json.loads(meta["state"])


def _restore_layer(layer: LayerCache, i: int, entry: dict, tensors: dict, folder: pathlib.Path, device) -> None:
    spec = layer.config.span_policy.spec
    layer.seen, layer.chunks_seen, layer.evicted = int(entry["seen"]), int(entry["chunks_seen"]), int(entry["evicted"])
    if entry["layout"] is not None:
        b, h, d, dtype = entry["layout"]
        layer.layout = (int(b), int(h), int(d), _DTYPES[dtype], torch.device(device))
    for part in ("sink", "tail"):
        chunks = [
            Chunk(tensors.pop(f"L{i}.{part}{j}.k").to(device), tensors.pop(f"L{i}.{part}{j}.v").to(device), int(start))
            for j, start in enumerate(entry[part])
        ]
        setattr(layer, part, chunks)
    for sp in entry["spans"]:
        ckv = CompressedKV.load(folder / sp["file"], device=device)
        if ckv.spec != spec:
            raise CorruptDataError(f"{sp['file']}: compressed by {ckv.spec!r}, the cache compresses with {spec!r}")
        layer.spans.append(Span(ckv, int(sp["start"]), int(sp["skip"])))
    warm = entry["warm"]
    if warm is not None and warm["from"] == "last_span":
        layer.warm = centroids_only(layer.spans[-1].ckv)
    elif warm is not None:
        parts = []
        for name in ("k", "v"):
            hd = warm[name]
            stages = tuple(
                StageData(tensors.pop(f"L{i}.warm.{name}.stage{t}").to(device), None) for t in range(int(hd["stages"]))
            )
            parts.append(CompressedTensor(TensorFormat.from_dict(hd["format"]), tuple(hd["shape"]),
                                          _DTYPES[hd["dtype"]], int(hd["quantized_tokens"]),
                                          None, None, None, None, stages, None))
        layer.warm = CompressedKV(parts[0], parts[1], warm["spec"])


def load_cache(path: str | os.PathLike, device: str | torch.device = "cpu") -> KVCache:
    """Read a cache written by :func:`save_cache`, every tensor placed on ``device``."""
    folder = pathlib.Path(path)
    tensors, state = _read_state(folder)
    try:
        config = CacheConfig.from_dict(state["config"])
        cache = KVCache(config.policy, num_layers=state["num_layers"],
                        **{k: v for k, v in state["config"].items() if k != "policy"})
        for i, entry in enumerate(state["layers"]):
            _restore_layer(cache.layer(i), i, entry, tensors, folder, device)
    except FileNotFoundError:
        raise
    except CorruptDataError:
        raise
    except (QKVError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise CorruptDataError(f"{folder}: inconsistent cache state ({type(exc).__name__}: {exc})") from None
    if tensors:
        raise CorruptDataError(f"{folder / STATE}: unexpected tensors {sorted(tensors)[:5]}")
    return cache
