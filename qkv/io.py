"""Signed safetensors files: the one way qkv writes and reads data (spans and caches).

A file holds named tensors and a JSON header. Its metadata names the file ``kind`` and
``version`` and carries a SHA-256 over every tensor (name, dtype, shape, bytes) and the header,
so a damaged or edited file raises :class:`CorruptDataError` instead of loading. No pickle is
involved. Identical data gives identical bytes (the safetensors header is written with sorted
keys), and files are created like any other file (permissions from the umask).

A valid digest only says the file is as some qkv version wrote it; what reads the header still
checks every field against the others and against the tensors (and :func:`check_stored` rejects
NaN/Inf), since a forger can re-sign an edited file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from qkv.errors import CorruptDataError, DeviceError, shown

_ALIGN = 8  # safetensors pads its JSON header to a multiple of 8 bytes


def digest(tensors: dict[str, torch.Tensor], header: str) -> str:
    """SHA-256 over ``tensors`` (sorted by name: name, dtype, shape and bytes of each) and ``header``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(header.encode())
    return h.hexdigest()


def _sorted_file(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header re-written with sorted keys: safetensors
    writes the metadata in hash-map order, which differs between two saves of the same data."""
    n = int.from_bytes(data[:8], "little")
    text = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def write(path: str | os.PathLike, kind: str, version: str, tensors: dict[str, torch.Tensor], header: dict) -> str:
    """Write ``tensors`` (copied to the CPU, contiguous) and ``header`` to ``path``, replacing it
    whole (written beside it, then renamed); returns the file's digest."""
    path = pathlib.Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path.name}: the folder {shown(str(path.parent))} does not exist")
    plain = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    text = json.dumps(header, sort_keys=True)
    sha = digest(plain, text)
    data = _sorted_file(save(plain, metadata={"format": kind, "version": version, "header": text, "sha256": sha}))
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as f:  # mode 0o666 less the umask, as any file
        f.write(data)
    os.replace(partial, path)
    return sha


def read(path: str | os.PathLike, kind: str, version: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors on the CPU, header, digest) of a file written by :func:`write` with this ``kind``
    and ``version``; raises :class:`CorruptDataError` if it is not one or its digest does not match
    (and ``FileNotFoundError`` if there is no such file)."""
    where = shown(os.fspath(path))
    data = pathlib.Path(path).read_bytes()
    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError, AttributeError) as exc:
        raise CorruptDataError(f"{where}: not a readable safetensors file ({shown(str(exc))})") from None
    if meta.get("format") != kind or meta.get("version") != version:
        raise CorruptDataError(
            f"{where}: not a {kind} file of version {version} "
            f"(format={shown(meta.get('format'))}, version={shown(meta.get('version'))})"
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


def field(header: object, key: str, kind: type | tuple[type, ...], where: str) -> object:
    """``header[key]``, which must be of ``kind`` (bool is never an int here); else
    :class:`CorruptDataError` naming ``where``."""
    if not isinstance(header, dict) or key not in header:
        raise CorruptDataError(f"{where}: the header has no {key!r}")
    value = header[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise CorruptDataError(f"{where}.{key}: expected {kind}, found {shown(value)}")
    return value


def int_field(header: object, key: str, low: int, high: int, where: str) -> int:
    """``header[key]``, an int in [low, high]."""
    value = field(header, key, int, where)
    if not low <= value <= high:
        raise CorruptDataError(f"{where}.{key}: {shown(value)} outside [{low}, {high}]")
    return value


def check_stored(name: str, t: torch.Tensor, inf_ok: bool = False) -> None:
    """Raise :class:`CorruptDataError` if the float tensor ``t`` read from a file holds NaN, or Inf
    unless ``inf_ok`` (values cast to a narrower format may have overflowed to Inf)."""
    if not t.is_floating_point() or not t.numel():
        return
    wide = t.float()
    bad = wide.isnan() if inf_ok else ~wide.isfinite()
    if bool(bad.any()):
        first = tuple(torch.nonzero(bad)[0].tolist())
        what = "NaN" if inf_ok else "NaN/Inf"
        raise CorruptDataError(f"{name}: {int(bad.sum())} stored {what} values (first at index {first})")


def load_device(device: object) -> torch.device:
    """``device`` as a torch.device that tensors can be loaded onto here, else a typed error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device must be a torch.device or a name such as 'cpu' or 'cuda:0', got {shown(device)}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"cannot load onto {dev}: CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"cannot load onto {dev}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"cannot load onto {dev}: qkv loads onto 'cpu' or 'cuda'")
    if dev.type == "cuda" and dev.index is None:  # the device tensors placed on "cuda" report
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
