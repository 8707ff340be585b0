"""Hot-path operations, each with a plain-PyTorch reference and one dispatcher.

Every policy calls these functions; none has a private copy. ``backend`` picks the
implementation: ``"torch"`` (the reference, runs anywhere), ``"triton"`` (GPU kernels, where
registered) or ``"auto"`` (Triton for CUDA tensors when an implementation is registered and Triton
imports, the reference otherwise).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from qkv.errors import BackendError
from qkv.kernels.hadamard import hadamard_torch
from qkv.kernels.kmeans import assign_torch, update_torch
from qkv.kernels.quantize import QuantizedRows, dequantize_torch, quantize_pack_torch


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


_IMPLS: dict[str, dict[Backend, Callable]] = {
    "quantize_pack": {Backend.TORCH: quantize_pack_torch},
    "dequantize": {Backend.TORCH: dequantize_torch},
    "kmeans_assign": {Backend.TORCH: assign_torch},
    "kmeans_update": {Backend.TORCH: update_torch},
    "hadamard": {Backend.TORCH: hadamard_torch},
}


def register_impl(op: str, backend: Backend | str, fn: Callable) -> None:
    """Register ``fn`` as the ``backend`` implementation of ``op`` (used by kernel modules)."""
    _IMPLS[op][Backend(backend)] = fn


def implementations(op: str) -> list[str]:
    """Backends that implement ``op``."""
    return [b.value for b in _IMPLS[op]]


def resolve(op: str, backend: Backend | str, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` on ``device``."""
    try:
        choice = Backend(backend)
    except ValueError:
        valid = ", ".join(b.value for b in Backend)
        raise BackendError(f"unknown backend {backend!r}; valid backends: {valid}") from None
    impls = _IMPLS[op]
    if choice is Backend.AUTO:
        return impls.get(Backend.TRITON) if device.type == "cuda" and Backend.TRITON in impls else impls[Backend.TORCH]
    if choice not in impls:
        raise BackendError(
            f"operation {op!r} has no {choice.value} implementation; available: "
            f"{', '.join(implementations(op))}"
        )
    return impls[choice]


def quantize_pack(x, quantizer, packer, *, backend: Backend | str = "auto") -> QuantizedRows:
    """Quantize rows [N, R, L] in blocks along L and pack the codes (see kernels.quantize)."""
    return resolve("quantize_pack", backend, x.device)(x, quantizer, packer)


def dequantize(rows, quantizer, packer, tokens, centroids, assignments, *, backend="auto"):
    """Unpack + dequantize + add every stage's centroids -> fp32 [N, tokens, D]."""
    return resolve("dequantize", backend, rows.codes.device)(
        rows, quantizer, packer, tokens, centroids, assignments
    )


def kmeans_assign(x, centroids, *, backend="auto"):
    """Nearest centroid: ([N, S] int64, squared distances [N, S])."""
    return resolve("kmeans_assign", backend, x.device)(x, centroids)


def kmeans_update(x, assignments, centroids, *, backend="auto"):
    """Deterministic cluster means (empty clusters keep ``centroids``): ([N, C, D], counts)."""
    return resolve("kmeans_update", backend, x.device)(x, assignments, centroids)


def hadamard(x, *, backend="auto"):
    """Normalized Walsh-Hadamard transform along the last dim (self-inverse)."""
    return resolve("hadamard", backend, x.device)(x)


__all__ = [
    "Backend",
    "QuantizedRows",
    "dequantize",
    "hadamard",
    "implementations",
    "kmeans_assign",
    "kmeans_update",
    "quantize_pack",
    "register_impl",
    "resolve",
]
