"""Input checks shared by every entry point: typed errors that name the problem."""

from __future__ import annotations

import torch

from qkv.dtypes import INPUT_DTYPES
from qkv.errors import DeviceError, DTypeError, NonFiniteError, ShapeError, ValueRangeError

# Largest magnitude accepted: leaves room for sums, rotations and centroid differences in fp32.
MAX_MAGNITUDE = 2.0**120


def check_kv_layout(name: str, x: object) -> torch.Tensor:
    """Type, rank, dtype and non-empty checks (no data access)."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise DTypeError(f"{name} is a {x.layout} tensor; qkv takes dense (strided) tensors: call .to_dense()")
    if x.is_meta:
        raise DeviceError(f"{name} is on the meta device: it holds no values to compress")
    if x.dim() != 4:
        raise ShapeError(f"{name} must have rank 4 [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise DTypeError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if 0 in x.shape:
        axis = ("batch", "heads", "tokens (S)", "head_dim")[list(x.shape).index(0)]
        raise ShapeError(f"{name} is empty along {axis}: shape {tuple(x.shape)}")
    return x


def check_kv_values(name: str, x: torch.Tensor, *more: tuple[str, torch.Tensor]) -> None:
    """Finite, and |x| <= 2**120; ``more``: further (name, tensor) pairs checked with the same
    single read-back to the host (one reduction per tensor; details computed only on failure)."""
    named = [(name, x), *more]
    peaks = torch.stack([torch.linalg.vector_norm(t, ord=float("inf")).float() for _, t in named])
    for (label, t), peak in zip(named, peaks.tolist()):  # max |x|; NaN, Inf propagate
        if not (peak < float("inf")):  # NaN compares false
            finite = torch.isfinite(t)
            bad = int((~finite).sum())
            first = tuple(torch.nonzero(~finite)[0].tolist())
            raise NonFiniteError(f"{label} holds {bad} NaN/Inf values (first at index {first})")
        if peak > MAX_MAGNITUDE:
            raise ValueRangeError(
                f"{label} has magnitude {peak:.3g} > 2**120, beyond what qkv can process without overflow"
            )


def check_kv_tensor(name: str, x: object) -> torch.Tensor:
    """Validate one K or V tensor: [B, H, S, D], fp32/fp16/bf16, S > 0, finite, |x| <= 2**120."""
    check_kv_layout(name, x)
    check_kv_values(name, x)
    return x


def check_kv_pair(k: object, v: object, values: bool = True) -> None:
    """Validate K and V together: each valid, same shape, same device; ``values``: also finite and
    in range (one read-back for both)."""
    check_kv_layout("k", k)
    check_kv_layout("v", v)
    if k.shape != v.shape:
        raise ShapeError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.device != v.device:
        raise DeviceError(f"k is on {k.device} but v is on {v.device}")
    if values:
        check_kv_values("k", k, ("v", v))
