"""Batch and head surgery on compressed data, without decompressing.

Every tensor a :class:`CompressedTensor` stores is laid out ``[B, H, ...]`` (codes, scales, zeros,
``scale_mult`` [B, H], centroids [B, H, C, D], assignments [B, H, S_q], fp_tokens), and compression
treats each (batch, head) row on its own. So concatenating along heads, or selecting batch rows,
is exact on the stored bytes: decompress(cat_heads(parts)) == cat(decompress(part) for part in parts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from qkv.compressed import CompressedKV, CompressedTensor, StageData
from qkv.errors import ShapeError

_FIELDS = ("codes", "scales", "zeros", "scale_mult", "fp_tokens")


def _combine(
    parts: Sequence[CompressedTensor], fn: Callable[[list[torch.Tensor]], torch.Tensor], shape: tuple[int, ...]
) -> CompressedTensor:
    """Apply ``fn`` field by field across ``parts`` (which share everything but the stored values)."""
    first = parts[0]

    def join(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
        if all(t is None for t in tensors):
            return None
        if any(t is None for t in tensors):
            raise ShapeError("compressed parts store different fields; they come from different policies")
        return fn(tensors)

    fields = {name: join([getattr(p, name) for p in parts]) for name in _FIELDS}
    stages = tuple(
        StageData(join([p.stages[i].centroids for p in parts]), join([p.stages[i].assignments for p in parts]))
        for i in range(len(first.stages))
    )
    return dataclasses.replace(first, shape=shape, stages=stages, **fields)


def _check_alike(parts: Sequence[CompressedTensor], name: str) -> None:
    first = parts[0]
    for p in parts[1:]:
        if (p.shape[0], p.shape[2], p.shape[3]) != (first.shape[0], first.shape[2], first.shape[3]) or (
            p.dtype,
            p.quantized_tokens,
            len(p.stages),
        ) != (first.dtype, first.quantized_tokens, len(first.stages)):
            raise ShapeError(f"{name}: parts differ beyond their heads: {first.shape} vs {p.shape}")


def cat_heads(parts: Sequence[CompressedKV]) -> CompressedKV:
    """Concatenate compressed spans of the same tokens along heads: [B, H_i, S, D] -> [B, sum H_i, S, D]."""
    if not parts:
        raise ShapeError("cat_heads needs at least one part")
    if len({p.spec for p in parts}) != 1:
        raise ShapeError(f"cat_heads: parts come from different policies {sorted({p.spec for p in parts})}")
    out = []
    for name in ("k", "v"):
        tensors = [getattr(p, name) for p in parts]
        _check_alike(tensors, name)
        b, _, s, d = tensors[0].shape
        shape = (b, sum(t.shape[1] for t in tensors), s, d)
        out.append(_combine(tensors, lambda ts: torch.cat(ts, dim=1), shape))
    return CompressedKV(out[0], out[1], parts[0].spec)


def select_heads(ckv: CompressedKV, start: int, stop: int) -> CompressedKV:
    """Heads ``start:stop`` of a compressed span: [B, H, S, D] -> [B, stop - start, S, D] (copies)."""
    out = []
    for ct in (ckv.k, ckv.v):
        b, h, s, d = ct.shape
        if not 0 <= start < stop <= h:
            raise ShapeError(f"heads {start}:{stop} outside [0, {h})")
        out.append(_combine([ct], lambda ts: ts[0][:, start:stop].clone(), (b, stop - start, s, d)))
    return CompressedKV(out[0], out[1], ckv.spec)


def index_batch(ckv: CompressedKV, index: torch.Tensor) -> CompressedKV:
    """Batch rows ``index`` (1-D int64) of a compressed span: [B, H, S, D] -> [len(index), H, S, D]."""
    out = []
    for ct in (ckv.k, ckv.v):
        _, h, s, d = ct.shape
        out.append(_combine([ct], lambda ts: ts[0].index_select(0, index.to(ts[0].device)), (len(index), h, s, d)))
    return CompressedKV(out[0], out[1], ckv.spec)


def batch_rows(ct: CompressedTensor, start: int, stop: int) -> CompressedTensor:
    """Batch rows ``start:stop`` of one compressed tensor: [B, H, S, D] -> [stop - start, H, S, D]
    (copies: the result owns its storage)."""
    _, h, s, d = ct.shape
    return _combine([ct], lambda ts: ts[0][start:stop].clone(), (stop - start, h, s, d))
