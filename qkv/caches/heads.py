"""Batch and head surgery on compressed data, without decompressing.

Every tensor a :class:`CompressedTensor` stores is laid out ``[B, H, ...]`` (codes, scales, zeros,
``scale_mult`` [B, H], centroids [B, H, C, D], assignments [B, H, S_q], fp_tokens), and compression
treats each (batch, head) row on its own. So selecting heads or batch rows is exact on the stored
bytes: decompress(select_heads(ckv, a, b)) == the heads a .. b of decompress(ckv).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from qkv.compressed import CompressedKV, CompressedTensor
from qkv.errors import ShapeError

def _map(ct: CompressedTensor, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> CompressedTensor:
    """``ct`` with ``fn`` applied to every stored tensor (all laid out [B, H, ...]), of ``shape``."""
    return dataclasses.replace(ct.mapped(fn), shape=shape)


def select_heads(ckv: CompressedKV, start: int, stop: int) -> CompressedKV:
    """Heads ``start:stop`` of a compressed span: [B, H, S, D] -> [B, stop - start, S, D] (copies)."""
    out = []
    for ct in (ckv.k, ckv.v):
        b, h, s, d = ct.shape
        if not 0 <= start < stop <= h:
            raise ShapeError(f"heads {start}:{stop} outside [0, {h})")
        out.append(_map(ct, lambda t: t[:, start:stop].clone(), (b, stop - start, s, d)))
    return CompressedKV(out[0], out[1], ckv.spec)


def index_batch(ckv: CompressedKV, index: torch.Tensor) -> CompressedKV:
    """Batch rows ``index`` (1-D int64) of a compressed span: [B, H, S, D] -> [len(index), H, S, D]."""
    out = []
    for ct in (ckv.k, ckv.v):
        _, h, s, d = ct.shape
        out.append(_map(ct, lambda t: t.index_select(0, index.to(t.device)), (len(index), h, s, d)))
    return CompressedKV(out[0], out[1], ckv.spec)


def batch_rows(ct: CompressedTensor, start: int, stop: int) -> CompressedTensor:
    """Batch rows ``start:stop`` of one compressed tensor: [B, H, S, D] -> [stop - start, H, S, D]
    (copies: the result owns its storage)."""
    _, h, s, d = ct.shape
    return _map(ct, lambda t: t[start:stop].clone(), (stop - start, h, s, d))
