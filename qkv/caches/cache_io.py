"""Saving and restoring a :class:`~qkv.KVCache`'s state dict as a folder of signed files
(:mod:`qkv.io`; safetensors, no pickle).

A saved cache is a folder:

- ``L<i>.S<j>.safetensors``: stored span j of layer i, written as :meth:`CompressedKV.save` writes
  it (:func:`qkv.compressed.load_compressed` says what loading checks);
- ``cache.safetensors``: every full-precision chunk (``L<i>.sink<j>.k`` ...) and the warm-start
  centroids no stored span shares, and in its header the cache config (policy spec included),
  ``num_layers``, each layer's counters and layout, and for every span its skip and **the digest
  of its file**. The file's own digest covers all of it, so the set of span files belongs to
  this one save.

Loading never takes a path from a file (span files are named by their layer and index), reads
each span file and requires exactly the digest the cache recorded for it (a span file swapped
with another, copied from another layer or another save, or a ``cache.safetensors`` from another
save, is rejected; so is a missing one), checks every header field for type and range before using
it, and returns the state dict for :meth:`KVCache.load_state_dict`, which checks that the counters
and tensors add up (:mod:`qkv.caches.layer_state`). Anything wrong raises :class:`CorruptDataError`.
"""

from __future__ import annotations

import os
import pathlib

import torch

from qkv import io
from qkv.compressed import CompressedKV, CompressedTensor, StageData, load_compressed, read_tensor_header, tensor_header
from qkv.errors import CorruptDataError, shown
from qkv.io import field, int_field

KIND = "qkv.kvcache"
VERSION = "3"
STATE = "cache.safetensors"


def span_file(layer: int, index: int) -> str:
    return f"L{layer}.S{index}.safetensors"


def _warm_header(warm: object, prefix: str, tensors: dict[str, torch.Tensor]) -> object:
    """How a layer's warm start is saved: None, "last_span", or its centroids (into ``tensors``)."""
    if not isinstance(warm, CompressedKV):
        return warm
    out = {"spec": warm.spec}
    for name, ct in (("k", warm.k), ("v", warm.v)):
        out[name] = tensor_header(ct)
        for t, stage in enumerate(ct.stages):
            tensors[f"{prefix}.warm.{name}.stage{t}"] = stage.centroids
    return out


def save_cache(path: str | os.PathLike, state: dict) -> None:
    """Write a :meth:`KVCache.state_dict` into the folder ``path`` (created; span files of an
    older save there that this one does not write are removed)."""
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers, files = [], set()
    for i, layer in enumerate(state["layers"]):
        entry = {key: layer[key] for key in ("seen", "evicted", "layout")}
        for part in ("sink", "tail"):
            for j, (k, v) in enumerate(layer[part]):
                tensors[f"L{i}.{part}{j}.k"], tensors[f"L{i}.{part}{j}.v"] = k, v
            entry[part] = len(layer[part])
        entry["spans"] = []
        for j, (ckv, skip) in enumerate(layer["spans"]):
            name = span_file(i, j)
            entry["spans"].append({"sha256": ckv.save(folder / name), "skip": skip})
            files.add(name)
        entry["warm"] = _warm_header(layer["warm"], f"L{i}", tensors)
        layers.append(entry)
    header = {"config": state["config"], "num_layers": state["num_layers"], "layers": layers}
    io.write(folder / STATE, KIND, VERSION, tensors, header)
    for stale in folder.glob("L*.S*.safetensors"):
        if stale.name not in files:
            stale.unlink()


def _pop(tensors: dict[str, torch.Tensor], name: str, device: torch.device, where: str) -> torch.Tensor:
    if name not in tensors:
        raise CorruptDataError(f"{where}: tensor {name} is missing")
    return tensors.pop(name).to(device)


def _load_warm(data: object, prefix: str, tensors: dict, device: torch.device, where: str) -> object:
    if data is None or data == "last_span":
        return data
    spec = field(data, "spec", str, where)
    parts = []
    for name in ("k", "v"):
        fmt, shape, dtype, tokens, stages = read_tensor_header(data.get(name), f"{where}.{name}")
        cents = tuple(
            StageData(_pop(tensors, f"{prefix}.warm.{name}.stage{t}", device, where), None) for t in range(stages)
        )
        parts.append(CompressedTensor(format=fmt, shape=shape, dtype=dtype, quantized_tokens=tokens, codes=None,
                                      scales=None, zeros=None, scale_mult=None, stages=cents, fp_tokens=None))
    return CompressedKV(parts[0], parts[1], spec)


def _load_layer(folder: pathlib.Path, i: int, entry: object, tensors: dict, device: torch.device) -> dict:
    """Layer ``i``'s state dict (tensors on ``device``), its structure and span files checked."""
    where = f"{STATE}: layer {i}"
    if not isinstance(entry, dict):
        raise CorruptDataError(f"{where}: expected a JSON object, found {shown(entry)}")
    out = {key: entry.get(key) for key in ("seen", "evicted", "layout")}
    for part in ("sink", "tail"):
        count = int_field(entry, part, 0, len(tensors), where)
        out[part] = [
            (_pop(tensors, f"L{i}.{part}{j}.k", device, where), _pop(tensors, f"L{i}.{part}{j}.v", device, where))
            for j in range(count)
        ]
    spans = field(entry, "spans", list, where)
    out["spans"] = []
    for j, span in enumerate(spans):
        name = span_file(i, j)
        sha = field(span, "sha256", str, f"{where} span {j}")
        if not (folder / name).is_file():
            raise CorruptDataError(f"{folder / name}: span file missing (the cache lists {len(spans)} spans for layer {i})")
        ckv, found = load_compressed(folder / name, device)
        if found != sha:
            raise CorruptDataError(f"{folder / name}: not the span file this cache saved (its digest differs)")
        out["spans"].append((ckv, span.get("skip")))
    out["warm"] = _load_warm(entry.get("warm"), f"L{i}", tensors, device, f"{where} warm")
    return out


def load_cache(path: str | os.PathLike, device: torch.device) -> dict:
    """The state dict saved in the folder ``path`` by :func:`save_cache`, tensors on ``device``
    (see the module docstring for what is checked here; the counters are checked by
    :meth:`KVCache.load_state_dict`)."""
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{shown(str(path))} is not a folder (a saved KVCache is one)")
    tensors, header, _ = io.read(folder / STATE, KIND, VERSION)
    config = field(header, "config", dict, STATE)
    layers = field(header, "layers", list, STATE)
    num_layers = header.get("num_layers")
    if num_layers is not None and (isinstance(num_layers, bool) or num_layers != len(layers)):
        raise CorruptDataError(f"{STATE}: num_layers={shown(num_layers)}, but {len(layers)} layers are stored")
    state = {
        "config": config,
        "num_layers": num_layers,
        "layers": [_load_layer(folder, i, entry, tensors, device) for i, entry in enumerate(layers)],
    }
    if tensors:
        raise CorruptDataError(f"{STATE}: unexpected tensors {shown(sorted(tensors)[:5])}")
    return state
