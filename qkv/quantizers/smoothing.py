"""Smoothing: reversible transforms that shrink what the quantizer sees.

- ``centroid``: subtract each token's group centroid (stored in ``dtype``, bf16 by default, saturated
  to its finite range, and subtracted *as stored*, so decoding adds back exactly what was removed). Additive: decoding
  fuses the add-back of every stage into the dequantize kernel, and encoding can leave the last
  stage's subtraction to the quantize+pack kernel (see :meth:`Smoother.offsets`).
- ``hadamard``: rotate along D by the normalized Hadamard matrix (spreads channel outliers);
  inverted after dequantization. Needs D a power of two; takes no grouping.
- ``none``: identity.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv import kernels
from qkv.bounds import ErrorState, additive_propagate, rotation_propagate
from qkv.component import Component, check_choice
from qkv.dtypes import FLOAT_FORMATS, saturate
from qkv.grouping.base import Groups
from qkv.kernels.kmeans import gather_centroids
from qkv.registry import Registry

SMOOTHING: Registry["Smoother"] = Registry("smoothing")


@dataclasses.dataclass(frozen=True)
class Smoother(Component):
    """Base class.

    ``needs_groups``: requires a grouping other than ``none``; ``additive``: the inverse adds
    stored centroids (so decoding can fuse it into the dequantize kernel). A smoother whose
    forward *is* "subtract stored centroids" also says so through :meth:`offsets`, which lets
    encoding fuse that subtraction into the quantize kernel.
    """

    needs_groups: ClassVar[bool] = False
    additive: ClassVar[bool] = False

    def forward(
        self, x: torch.Tensor, groups: Groups | None, *, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, S, D] (input dtype at the first stage, fp32 after) -> (residual, centroids to
        store [N, C, D] or None); the residual is fp32 except for ``none``, which passes x."""
        raise NotImplementedError

    def offsets(
        self, x: torch.Tensor, groups: Groups | None, *, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What :meth:`forward` subtracts, without subtracting it: ``(stored, assignments)``,
        stored centroids [N, C, D] and assignments [N, S] (integer) such that ``forward(x, groups)``
        returns ``(subtract_centroids(x, stored, assignments), stored)`` bit for bit; or None (the
        default) when forward is not such a subtraction.

        When a smoother returns them, the staging can hand the last stage's subtraction to
        ``kernels.quantize_pack(..., centroids=[stored], assignments=[assignments])``, which
        computes the residual in registers instead of writing it out (see docs/kernels.md).
        """
        return None

    def inverse(self, x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """Undo a non-additive transform on fp32 [N, S, D]."""
        raise NotImplementedError

    def propagate(self, state: ErrorState, added: torch.Tensor | None) -> ErrorState:
        """The error bound after decoding undoes this stage, given the bound before it.

        ``added``: for an additive smoother, the values decoding adds back for this stage
        ([N, S, D], centroids gathered by assignment), else None. The default declares nothing:
        the policy then reports no bound (see :mod:`qkv.bounds` for the rules to reuse, e.g.
        :func:`~qkv.bounds.additive_propagate`).
        """
        return state.with_none(
            f"smoothing {self.name!r} ({type(self).__name__}) declares no error propagation; "
            "define propagate() (see docs/testing.md)"
        )


def subtract_centroids(x: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """x [N, S, D] (fp32/fp16/bf16) minus each token's centroid: fp32 [N, S, D], computed as
    ``x.float() - gather_centroids(centroids, assignments)`` (the fp32 value of the stored
    centroid), exactly what ``kernels.quantize_pack(x, ..., centroids=[c], assignments=[a])``
    quantizes."""
    return x - gather_centroids(centroids, assignments)


@SMOOTHING.register("centroid")
@dataclasses.dataclass(frozen=True)
class CentroidSmoother(Smoother):
    """Spec: ``centroid`` or ``centroid(dtype=fp16)`` (centroid storage format)."""

    name: ClassVar[str] = "centroid"
    needs_groups: ClassVar[bool] = True
    additive: ClassVar[bool] = True
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        check_choice("centroid", "dtype", self.dtype, ("fp32", "fp16", "bf16"))

    @property
    def storage_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.dtype]

    def offsets(self, x, groups, *, backend="auto"):
        return saturate(groups.centroids, self.storage_dtype), groups.assignments

    def forward(self, x, groups, *, backend="auto"):
        stored, assignments = self.offsets(x, groups, backend=backend)
        return subtract_centroids(x, stored, assignments), stored

    def propagate(self, state, added):
        """Passes the bound through plus two fp32 roundings (centroids are subtracted as stored):
        see :func:`qkv.bounds.additive_propagate`."""
        return additive_propagate(state)


@SMOOTHING.register("hadamard")
@dataclasses.dataclass(frozen=True)
class HadamardSmoother(Smoother):
    """Spec: ``hadamard`` (QuaRot's rotation of keys and values)."""

    name: ClassVar[str] = "hadamard"

    def forward(self, x, groups, *, backend="auto"):
        return kernels.hadamard(x.float(), backend=backend), None

    def inverse(self, x, *, backend="auto"):
        return kernels.hadamard(x, backend=backend)

    def propagate(self, state, added):
        """Per-element bound in, per-token L2 bound out: see :func:`qkv.bounds.rotation_propagate`."""
        return rotation_propagate(state)


@SMOOTHING.register("none")
@dataclasses.dataclass(frozen=True)
class NoSmoothing(Smoother):
    name: ClassVar[str] = "none"

    def forward(self, x, groups, *, backend="auto"):
        return x, None

    def inverse(self, x, *, backend="auto"):
        return x

    def propagate(self, state, added):
        return state
