"""Signed safetensors files: the one way qkv writes and reads data (spans and caches).

A file holds named tensors and a small JSON-able header. Its metadata names the file ``kind``
and ``version`` and carries a SHA-256 over every tensor (name, dtype, shape, bytes) and the
header, so a damaged, edited or mismatched file raises :class:`CorruptDataError` instead of
loading. No pickle is involved.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from qkv.errors import CorruptDataError


def digest(tensors: dict[str, torch.Tensor], header: str) -> str:
    """SHA-256 over ``tensors`` (sorted by name: name, dtype, shape and bytes of each) and ``header``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(header.encode())
    return h.hexdigest()


def write(path: str | os.PathLike, kind: str, version: str, tensors: dict[str, torch.Tensor], header: dict) -> str:
    """Write ``tensors`` (copied to the CPU, contiguous) and ``header`` to ``path``; returns the
    file's digest."""
    plain = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    text = json.dumps(header, sort_keys=True)
    sha = digest(plain, text)
    save_file(plain, os.fspath(path), metadata={"format": kind, "version": version, "header": text, "sha256": sha})
    return sha


def read(path: str | os.PathLike, kind: str, version: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, header, digest) of a file written by :func:`write` with this ``kind`` and
    ``version``; raises :class:`CorruptDataError` if it is not one or its digest does not match."""
    where = os.fspath(path)
    try:
        with safe_open(where, framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(where)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptDataError(f"{where}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != kind or meta.get("version") != version:
        raise CorruptDataError(
            f"{where}: not a {kind} file of version {version} "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
        )
    text, sha = meta.get("header", ""), meta.get("sha256")
    if sha != digest(tensors, text):
        raise CorruptDataError(f"{where}: checksum mismatch: the file was modified or damaged")
    try:
        header = json.loads(text)
    except ValueError:
        raise CorruptDataError(f"{where}: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{where}: the header is not a JSON object")
    return tensors, header, sha
