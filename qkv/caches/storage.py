"""Saving and loading :class:`CompressedKV` as safetensors (no pickle).

The file holds every stored tensor under ``k.<name>`` / ``v.<name>`` and, in the metadata, the
policy spec, the original shapes and dtypes, and a SHA-256 over all tensor bytes and metadata.
Loading checks the digest and then that every tensor has exactly the shape and dtype the policy
would produce, so a truncated, tampered or mismatched file raises :class:`CorruptDataError`.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qkv.caches.compressed import CompressedKV, CompressedTensor, StageData
from qkv.dtypes import INPUT_DTYPES
from qkv.errors import CorruptDataError, QKVError

FORMAT = "qkv.compressed_kv"
VERSION = "1"
_DTYPES = {str(d): d for d in INPUT_DTYPES}


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _header(ct: CompressedTensor) -> dict:
    return {
        "shape": list(ct.shape),
        "dtype": str(ct.dtype),
        "quantized_tokens": ct.quantized_tokens,
        "stages": len(ct.stages),
    }


def save_compressed(ckv: CompressedKV, path: str | os.PathLike) -> None:
    """Write ``ckv`` to ``path`` (safetensors)."""
    tensors = {}
    for prefix, ct in (("k", ckv.k), ("v", ckv.v)):
        for name, t in ct.tensors().items():
            tensors[f"{prefix}.{name}"] = t.detach().contiguous().cpu()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "spec": ckv.spec,
        "k": json.dumps(_header(ckv.k)),
        "v": json.dumps(_header(ckv.v)),
    }
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, os.fspath(path), metadata=meta)


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptDataError(f"{os.fspath(path)}: not a readable safetensors file ({exc})") from None
    return tensors, meta


def _tensor_from(prefix: str, header: dict, tensors: dict[str, torch.Tensor]) -> CompressedTensor:
    def get(name: str) -> torch.Tensor | None:
        return tensors.pop(f"{prefix}.{name}", None)

    stages = tuple(
        StageData(get(f"stage{i}.centroids"), get(f"stage{i}.assignments"))
        for i in range(int(header["stages"]))
    )
    if header["dtype"] not in _DTYPES:
        raise CorruptDataError(f"{prefix}: unknown original dtype {header['dtype']!r}")
    return CompressedTensor(
        shape=tuple(int(x) for x in header["shape"]),
        dtype=_DTYPES[header["dtype"]],
        quantized_tokens=int(header["quantized_tokens"]),
        codes=get("codes"),
        scales=get("scales"),
        zeros=get("zeros"),
        scale_mult=get("scale_mult"),
        stages=stages,
        fp_tokens=get("fp_tokens"),
    )


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> CompressedKV:
    """Read and verify a file written by :func:`save_compressed`."""
    from qkv.caches.presets import build_policy
    from qkv.caches.layout import check_layout

    tensors, meta = _read(path)
    where = os.fspath(path)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CorruptDataError(
            f"{where}: not a qkv compressed file of version {VERSION} "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
        )
    stored = meta.pop("sha256", None)
    if stored != _digest(tensors, meta):
        raise CorruptDataError(f"{where}: checksum mismatch: the file was modified or damaged")
    try:
        policy = build_policy(meta["spec"])
        k = _tensor_from("k", json.loads(meta["k"]), tensors)
        v = _tensor_from("v", json.loads(meta["v"]), tensors)
    except (QKVError, KeyError, ValueError, TypeError) as exc:
        raise CorruptDataError(f"{where}: inconsistent metadata ({exc})") from None
    if tensors:
        raise CorruptDataError(f"{where}: unexpected tensors {sorted(tensors)}")
    check_layout(policy.k, k, "k")
    check_layout(policy.v, v, "v")
    return CompressedKV(k.to(device), v.to(device), meta["spec"])
