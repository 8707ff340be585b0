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
from qkv.component import check_int
from qkv.errors import ShapeError
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
        for key in ("t", "h", "w", "height", "width"):
            check_int("blocks", key, getattr(self, key), 1)

    def _frames(self, tokens: int) -> int:
        per_frame = self.height * self.width
        if tokens % per_frame:
            raise ShapeError(
                f"blocks: S={tokens} is not a whole number of {self.height}x{self.width} frames"
            )
        return tokens // per_frame

    def implicit_assignments(self, n: int, tokens: int, device: torch.device) -> torch.Tensor:
        self._frames(tokens)
        s = torch.arange(tokens, device=device)
        f, r, c = s // (self.height * self.width), (s // self.width) % self.height, s % self.width
        nh, nw = -(-self.height // self.h), -(-self.width // self.w)
        group = (f // self.t) * (nh * nw) + (r // self.h) * nw + (c // self.w)
        return group.unsqueeze(0).expand(n, -1)

    def num_groups(self, tokens: int) -> int:
        nf = -(-self._frames(tokens) // self.t)
        return nf * -(-self.height // self.h) * -(-self.width // self.w)

    def group(self, x, init=None, *, backend="auto") -> Groups:
        n, s, d = x.shape
        assign = self.implicit_assignments(n, s, x.device)
        start = torch.zeros(n, self.num_groups(s), d, device=x.device)
        centroids, _ = kernels.kmeans_update(x.float(), assign, start, backend=backend)
        return Groups(centroids, assign)
