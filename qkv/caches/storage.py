"""Saving and loading :class:`CompressedKV` as signed safetensors files (:mod:`qkv.io`).

The file holds every stored tensor under ``k.<name>`` / ``v.<name>`` and, in its header, the
policy spec and each tensor's original shape, dtype, quantized tokens and stage count. Loading
checks the digest, then every header field (type and range, before anything is built from it),
then that every tensor has exactly the shape and dtype the policy produces for that header, and
that no stored float is NaN (or Inf, but for values cast to a narrower float format, where an
overflow to Inf is what compression stored). A truncated, damaged, edited (even re-signed) or
mismatched file raises :class:`CorruptDataError`.
"""

from __future__ import annotations

import os

import torch

from qkv import io
from qkv.caches.compressed import CompressedKV, CompressedTensor, StageData
from qkv.caches.layout import check_layout
from qkv.caches.presets import build_policy
from qkv.dtypes import INPUT_DTYPES
from qkv.errors import CorruptDataError, QKVError, shown
from qkv.format import MAX_STAGES

KIND = "qkv.compressed_kv"
VERSION = "2"
DTYPES = {str(d): d for d in INPUT_DTYPES}


def header_of(ct: CompressedTensor) -> dict:
    """What a file records of ``ct`` besides its tensors."""
    return {"shape": list(ct.shape), "dtype": str(ct.dtype), "quantized_tokens": ct.quantized_tokens,
            "stages": len(ct.stages)}


def save_compressed(ckv: CompressedKV, path: str | os.PathLike) -> str:
    """Write ``ckv`` to ``path``; returns the file's digest."""
    tensors = {f"{side}.{name}": t for side, ct in (("k", ckv.k), ("v", ckv.v)) for name, t in ct.tensors().items()}
    header = {"spec": ckv.spec, "k": header_of(ckv.k), "v": header_of(ckv.v)}
    return io.write(path, KIND, VERSION, tensors, header)


def field(header: object, key: str, kind: type | tuple[type, ...], where: str) -> object:
    """``header[key]``, which must be of ``kind`` (bool is never an int here)."""
    if not isinstance(header, dict) or key not in header:
        raise CorruptDataError(f"{where}: the header has no {key!r}")
    value = header[key]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise CorruptDataError(f"{where}.{key}: expected {kind}, found {shown(value)}")
    if not isinstance(value, kind):
        raise CorruptDataError(f"{where}.{key}: expected {kind}, found {shown(value)}")
    return value


def int_field(header: object, key: str, low: int, high: int, where: str) -> int:
    value = field(header, key, int, where)
    if not low <= value <= high:
        raise CorruptDataError(f"{where}.{key}: {shown(value)} outside [{low}, {high}]")
    return value


def tensor_header(header: object, where: str) -> tuple[tuple[int, int, int, int], torch.dtype, int, int]:
    """(shape, dtype, quantized tokens, stages) of a tensor header, each checked on its own."""
    shape = field(header, "shape", list, where)
    if len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape):
        raise CorruptDataError(f"{where}.shape: expected 4 positive integers, found {shown(shape)}")
    dtype = field(header, "dtype", str, where)
    if dtype not in DTYPES:
        raise CorruptDataError(f"{where}.dtype: {shown(dtype)} is not one of {', '.join(DTYPES)}")
    tokens = int_field(header, "quantized_tokens", 0, shape[2], where)
    stages = int_field(header, "stages", 0, MAX_STAGES, where)
    return tuple(shape), DTYPES[dtype], tokens, stages


def tensor_from(side: str, header: object, tensors: dict[str, torch.Tensor], where: str) -> CompressedTensor:
    """The :class:`CompressedTensor` ``side`` ("k" / "v") of a loaded file (pops its tensors)."""
    shape, dtype, tokens, stages = tensor_header(header, f"{where}: {side}")

    def get(name: str) -> torch.Tensor | None:
        return tensors.pop(f"{side}.{name}", None)

    return CompressedTensor(
        shape=shape,
        dtype=dtype,
        quantized_tokens=tokens,
        codes=get("codes"),
        scales=get("scales"),
        zeros=get("zeros"),
        scale_mult=get("scale_mult"),
        stages=tuple(StageData(get(f"stage{i}.centroids"), get(f"stage{i}.assignments")) for i in range(stages)),
        fp_tokens=get("fp_tokens"),
    )


def check_tensor(policy, ct: CompressedTensor, name: str) -> None:
    """Every stored tensor of ``ct`` as ``policy`` stores it, and no NaN/Inf stored (Inf allowed in
    values cast to a float format)."""
    try:
        check_layout(policy, ct, name)
    except CorruptDataError:
        raise
    except QKVError as exc:  # e.g. a block grid that the stored token count does not fit
        raise CorruptDataError(f"{name}: {exc}") from None
    for field_name, t in ct.tensors().items():
        io.check_stored(f"{name}.{field_name}", t, inf_ok=field_name == "codes")


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CompressedKV, str]:
    """Read and verify a file written by :func:`save_compressed`: (data on ``device``, digest)."""
    device = io.load_device(device)
    tensors, header, sha = io.read(path, KIND, VERSION)
    where = shown(os.fspath(path))
    spec = field(header, "spec", str, where)
    try:
        policy = build_policy(spec)
    except QKVError as exc:
        raise CorruptDataError(f"{where}: the stored spec does not build a policy ({exc})") from None
    k = tensor_from("k", header.get("k"), tensors, where)
    v = tensor_from("v", header.get("v"), tensors, where)
    if tensors:
        raise CorruptDataError(f"{where}: unexpected tensors {shown(sorted(tensors)[:5])}")
    check_tensor(policy.k, k, f"{where}: k")
    check_tensor(policy.v, v, f"{where}: v")
    return CompressedKV(k.to(device), v.to(device), spec), sha
