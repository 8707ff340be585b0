"""The on-disk cache: one safetensors file per dataset.

File ``<cache_dir>/<dataset>.safetensors`` holds tensors ``"<i>.k"`` and ``"<i>.v"`` for sample ``i``
and string metadata:

- ``format``: ``"qkv.realdata"``; ``format_version``: ``FORMAT_VERSION``
- ``dataset``: the dataset name
- ``config``: JSON of the builder constants that determine the content (a mismatch means stale)
- ``samples``: JSON list of ``{"source", "layer", "label"}`` in sample order
- ``info``: JSON with provenance (library versions, inputs used, build seconds); informational only

A file whose format version or config differs from the current code is rebuilt.
Writes go to a temporary file first and are renamed into place, so readers never see half a file.
A build holds a lock file beside the datasets (:func:`build_lock`): processes that need the same
build at once (parallel test workers, two evaluations) build it once, the others then read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from qkv.realdata.sample import KVSample

__all__ = ["FORMAT", "FORMAT_VERSION", "build_lock", "cache_path", "default_cache_dir", "load", "read_info", "save"]

FORMAT = "qkv.realdata"
FORMAT_VERSION = 1
ENV_VAR = "QKV_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$QKV_CACHE_DIR`` if set, else ``~/.cache/qkv/realdata``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qkv" / "realdata"


def cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{name}.safetensors"


@contextlib.contextmanager
def build_lock(root: Path, builder: str) -> Iterator[None]:
    """Held while ``builder`` (a builder module's name) writes its datasets into folder ``root``:
    an exclusive lock on ``root/.<builder>.lock``, which another process taking it waits for."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{builder}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _config_json(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def save(
    path: Path,
    name: str,
    samples: Sequence[KVSample],
    config: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> None:
    """Write ``samples`` atomically to ``path`` (creating its folder)."""
    tensors = {}
    for i, s in enumerate(samples):
        tensors[f"{i}.k"] = s.k.contiguous()
        tensors[f"{i}.v"] = s.v.contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "dataset": name,
        "config": _config_json(config),
        "samples": json.dumps([{"source": s.source, "layer": s.layer, "label": s.label} for s in samples]),
        "info": json.dumps(info or {}, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared (CI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (OSError, ValueError, RuntimeError):  # missing, truncated or not safetensors
        return None


def _is_current(meta: dict[str, str] | None, name: str, config: dict[str, Any]) -> bool:
    return (
        meta is not None
        and meta.get("format") == FORMAT
        and meta.get("format_version") == str(FORMAT_VERSION)
        and meta.get("dataset") == name
        and meta.get("config") == _config_json(config)
    )


def load(path: Path, name: str, config: dict[str, Any]) -> list[KVSample] | None:
    """The cached samples, or ``None`` when the file is missing, unreadable or stale."""
    if not path.is_file():
        return None
    meta = _metadata(path)
    if not _is_current(meta, name, config):
        return None
    entries = json.loads(meta["samples"])
    with safe_open(path, framework="pt") as f:
        return [
            KVSample(
                source=e["source"],
                layer=int(e["layer"]),
                k=f.get_tensor(f"{i}.k"),
                v=f.get_tensor(f"{i}.v"),
                label=e["label"],
            )
            for i, e in enumerate(entries)
        ]


def read_info(path: Path) -> dict[str, Any]:
    """The provenance record stored with a dataset (empty if none)."""
    meta = _metadata(path) or {}
    return json.loads(meta.get("info", "{}"))
