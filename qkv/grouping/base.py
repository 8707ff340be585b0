"""What a grouping strategy is: it partitions the S tokens of each (batch, head) row into groups
and gives each group a centroid (the mean of its tokens, or the k-means centre)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv.component import Component
from qkv.registry import Registry

GROUPING: Registry["Grouper"] = Registry("grouping")


@dataclasses.dataclass(frozen=True)
class Groups:
    """centroids: [N, C, D] fp32; assignments: [N, S] int64 group index of every token."""

    centroids: torch.Tensor
    assignments: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Grouper(Component):
    """Base class. ``stores_assignments`` is False when assignments follow from S alone."""

    stores_assignments: ClassVar[bool] = True

    def group(
        self, x: torch.Tensor, init: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> Groups:
        """Group the tokens of ``x`` [N, S, D] (fp32); ``init`` [N, C, D] warm-starts centroids."""
        raise NotImplementedError

    def implicit_assignments(self, n: int, tokens: int, device: torch.device) -> torch.Tensor:
        """[N, S] assignments of a grouper that does not store them."""
        raise NotImplementedError(f"{self.name} stores its assignments")
