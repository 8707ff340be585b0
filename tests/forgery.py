"""Editing saved files the way a forger would: change tensors or header, then sign again."""

from __future__ import annotations

import json

from safetensors import safe_open
from safetensors.torch import save_file

from qkv import io


def read_raw(path) -> tuple[dict, dict, dict]:
    """(tensors, metadata, header) of a signed file, unchecked."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    return tensors, meta, json.loads(meta["header"])


def write_raw(path, tensors: dict, meta: dict, header: object, sign: bool = True) -> None:
    """Write ``tensors`` and ``header`` with ``meta``'s other fields; ``sign``: a valid digest."""
    meta = {**meta, "header": json.dumps(header)}
    if sign:
        meta["sha256"] = io.digest(tensors, meta["header"])
    save_file(tensors, str(path), metadata=meta)


def forge(path, edit) -> None:
    """Apply ``edit(tensors, header)`` to the file at ``path`` and sign it again."""
    tensors, meta, header = read_raw(path)
    edit(tensors, header)
    write_raw(path, tensors, meta, header)
