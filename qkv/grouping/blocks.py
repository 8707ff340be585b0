"""Spatial/temporal blocks of a known token grid: the group is the block, the centroid its mean.

Tokens are laid out frame by frame, row-major: token ``s`` is frame ``s // (height*width)``,
row ``(s // width) % height``, column ``s % width`` (Wan/Self-Forcing order). A block spans
``t`` frames x ``h`` rows x ``w`` columns; blocks at the edges may be smaller. Assignments follow
from S and the grid, so they are not stored; there is no clustering cost.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv import kernels
from qkv.format import BlockGrid
from qkv.grouping.base import GROUPING, Grouper, Groups


@GROUPING.register("blocks")
@dataclasses.dataclass(frozen=True)
class BlockGrouper(Grouper):
    """Spec: ``blocks(t=1,h=4,w=4,height=30,width=52)`` (grid of height x width tokens per frame)."""

    name: ClassVar[str] = "blocks"
    stores_assignments: ClassVar[bool] = False
    t: int = 1
    h: int = 4
    w: int = 4
    height: int = 30
    width: int = 52

    def __post_init__(self) -> None:
        self.grid  # validates every field (ConfigError naming it)

    @property
    def grid(self) -> BlockGrid:
        return BlockGrid(self.t, self.h, self.w, self.height, self.width)

    def predicted_groups(self, tokens: int) -> int:
        return self.grid.num_groups(tokens)

    def group(self, x, init=None, *, backend="auto") -> Groups:
        n, s, d = x.shape
        start = torch.zeros(n, self.predicted_groups(s), d, device=x.device)
        assign = self.grid.assignments(n, s, x.device)
        centroids, _ = kernels.kmeans_update(x.float(), assign, start, backend=backend)
        return Groups(centroids, assign)
