"""Plain-PyTorch reference of the normalized fast Walsh-Hadamard transform along the last dim."""

from __future__ import annotations

import math

import torch
from einops import rearrange

from qkv.errors import ShapeError


def hadamard_torch(x: torch.Tensor) -> torch.Tensor:
    """``x @ H / sqrt(D)`` for the Sylvester Hadamard matrix H; x: [..., D], D a power of two.

    The normalized transform is orthogonal and symmetric, so it is its own inverse.
    """
    d = x.shape[-1]
    if d & (d - 1) or d == 0:
        raise ShapeError(f"hadamard: D must be a power of two, got {d}")
    out = x.reshape(-1, d)
    h = 1
    while h < d:
        pairs = rearrange(out, "r (a two h) -> r a two h", two=2, h=h)
        lo, hi = pairs[:, :, 0], pairs[:, :, 1]
        out = rearrange(torch.stack((lo + hi, lo - hi), dim=2), "r a two h -> r (a two h)")
        h *= 2
    return (out / math.sqrt(d)).reshape(x.shape)


def hadamard_split_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hadamard_torch` of fp16/bf16 rows ``x`` in fp32, in two parts of x's dtype: the
    transform rounded to x's dtype, and the rest rounded likewise (their sum is the fp32 transform
    to ~2^-16 relative: queries against rotated keys, whose scores must be as exact as q . k)."""
    rotated = hadamard_torch(x.float())
    high = rotated.to(x.dtype)
    return high, rotated.sub_(high).to(x.dtype)
