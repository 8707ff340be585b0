"""Smoothing: reversible transforms that shrink what the quantizer sees.

- ``centroid``: subtract each token's group centroid (stored in ``dtype``, bf16 by default, saturated
  to its finite range, and subtracted *as stored*, so decoding adds back exactly what was removed).
  Undone by adding back (``Undo.ADD``): decoding fuses the add-back of every stage into the
  dequantize kernel, and encoding can leave the last stage's subtraction to the quantize+pack
  kernel (see :meth:`Smoother.offsets`).
- ``hadamard``: rotate along D by the normalized Hadamard matrix (spreads channel outliers);
  undone by the same rotation (``Undo.ROTATE``). Needs D a power of two; takes no grouping.
- ``none``: identity.

Decoding reads how a stage is undone from the data's format (:class:`~qkv.format.StageFormat`), so
a smoother declares it (``undo``) instead of implementing an inverse; so do the error bounds
(:mod:`qkv.bounds`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv import kernels
from qkv.component import Component, check_choice
from qkv.dtypes import FLOAT_FORMATS, saturate
from qkv.errors import ConfigError
from qkv.format import StageFormat, Undo
from qkv.grouping.base import Grouper, Groups
from qkv.kernels.kmeans import gather_centroids
from qkv.registry import Registry

SMOOTHING: Registry["Smoother"] = Registry("smoothing")


@dataclasses.dataclass(frozen=True)
class Smoother(Component):
    """Base class.

    ``undo``: how decoding undoes it: ``Undo.ADD`` (add the stored rows back, gathered by
    assignment; decoding fuses it into the dequantize kernel), ``Undo.ROTATE`` (the normalized
    Hadamard transform) or ``Undo.NONE`` (identity). ``needs_groups``: requires a grouping
    other than ``none``. ``rows``: storage format of the rows an add-back stores. A smoother
    whose forward *is* "subtract stored centroids" also says so through :meth:`offsets`, which
    lets encoding fuse that subtraction into the quantize kernel.
    """

    undo: ClassVar[Undo | None] = None
    needs_groups: ClassVar[bool] = False
    rows: ClassVar[str] = "bf16"

    def forward(
        self, x: torch.Tensor, groups: Groups | None, *, backend: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [N, S, D] (input dtype at the first stage, fp32 after) -> (residual, rows to store
        [N, C, D] or None); the residual is fp32 except for ``none``, which passes x."""
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

    def stage_format(self, grouping: Grouper) -> StageFormat:
        """How one stage of this smoother, after ``grouping``, is stored and undone."""
        if not isinstance(self.undo, Undo):
            raise ConfigError(
                f"smoothing {self.name!r} ({type(self).__name__}) declares no undo; set undo = Undo.ADD "
                "(decoding adds the stored rows back) or Undo.ROTATE (the Hadamard rotation)"
            )
        if self.undo is not Undo.ADD:
            return StageFormat(self.undo)
        return StageFormat(Undo.ADD, self.rows, assignments=grouping.stores_assignments, grid=grouping.grid)


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
    undo: ClassVar[Undo] = Undo.ADD
    needs_groups: ClassVar[bool] = True
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        check_choice("centroid", "dtype", self.dtype, ("fp32", "fp16", "bf16"))

    @property
    def rows(self) -> str:
        return self.dtype

    def offsets(self, x, groups, *, backend="auto"):
        return saturate(groups.centroids, FLOAT_FORMATS[self.dtype]), groups.assignments

    def forward(self, x, groups, *, backend="auto"):
        stored, assignments = self.offsets(x, groups, backend=backend)
        return subtract_centroids(x, stored, assignments), stored


@SMOOTHING.register("hadamard")
@dataclasses.dataclass(frozen=True)
class HadamardSmoother(Smoother):
    """Spec: ``hadamard`` (QuaRot's rotation of keys and values)."""

    name: ClassVar[str] = "hadamard"
    undo: ClassVar[Undo] = Undo.ROTATE

    def forward(self, x, groups, *, backend="auto"):
        return kernels.hadamard(x.float(), backend=backend), None


@SMOOTHING.register("none")
@dataclasses.dataclass(frozen=True)
class NoSmoothing(Smoother):
    name: ClassVar[str] = "none"
    undo: ClassVar[Undo] = Undo.NONE

    def forward(self, x, groups, *, backend="auto"):
        return x, None
