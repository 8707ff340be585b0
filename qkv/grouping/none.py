"""The ``none`` grouping: tokens are not grouped (for rotation-only or plain quantization)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qkv.grouping.base import GROUPING, Grouper


@GROUPING.register("none")
@dataclasses.dataclass(frozen=True)
class NoGrouping(Grouper):
    name: ClassVar[str] = "none"
    grouped: ClassVar[bool] = False
    stores_assignments: ClassVar[bool] = False

    def predicted_groups(self, tokens: int) -> int:
        """One row for every token (what an additive smoother without grouping stores)."""
        return 1

    def group(self, x, init=None, *, backend="auto"):
        return None
