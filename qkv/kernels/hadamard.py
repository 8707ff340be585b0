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
