"""Reader for CTranslate2 model files (binary format version 6).

Layout (little-endian)::

    u32 format version (6)
    string spec name            (u16 byte length including a trailing NUL, then the bytes)
    u32 spec revision
    u32 variable count
    per variable:
        string name, u8 rank, rank x u32 dims, u8 dtype, u32 byte count, raw bytes
    u32 alias count
    per alias: string alias, string target

dtype codes: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CT2Model", "read_ct2"]

SUPPORTED_VERSION = 6

_DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}


@dataclass(frozen=True)
class CT2Model:
    """A parsed CTranslate2 model: spec name, revision and named variables (aliases resolved)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.variables[name]


class _Cursor:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ValueError("truncated CTranslate2 model file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> str:
        n = self.unpack("H")
        return self.bytes(n).rstrip(b"\0").decode("utf-8")


def read_ct2(path: str | os.PathLike) -> CT2Model:
    """Read a CTranslate2 v6 ``model.bin`` into CPU tensors of their stored dtype.

    Scalars (rank 0) come back as 0-d tensors. Aliases (e.g. a tied output projection) point at the
    same tensor object as their target.
    """
    with open(path, "rb") as f:
        cur = _Cursor(f.read())
    version = cur.unpack("I")
    if version != SUPPORTED_VERSION:
        raise ValueError(f"unsupported CTranslate2 format version {version} (expected {SUPPORTED_VERSION})")
    spec = cur.string()
    revision = cur.unpack("I")
    variables: dict[str, torch.Tensor] = {}
    for _ in range(cur.unpack("I")):
        name = cur.string()
        rank = cur.unpack("B")
        dims = [cur.unpack("I") for _ in range(rank)]
        code = cur.unpack("B")
        if code not in _DTYPES:
            raise ValueError(f"variable {name!r}: unknown dtype code {code}")
        dtype = _DTYPES[code]
        raw = cur.bytes(cur.unpack("I"))
        # bf16 has no numpy dtype: read its bits as int16 and reinterpret.
        np_dtype = np.int16 if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype
        arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<")).copy()
        t = torch.from_numpy(arr)
        if dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        variables[name] = t.reshape(dims)
    for _ in range(cur.unpack("I")):
        alias, target = cur.string(), cur.string()
        variables[alias] = variables[target]
    if cur.pos != len(cur.buf):
        raise ValueError(f"{len(cur.buf) - cur.pos} trailing bytes after the alias table")
    return CT2Model(spec=spec, revision=revision, variables=variables)
