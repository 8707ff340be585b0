"""The ``none`` grouping: tokens are not grouped (for rotation-only or plain quantization)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qkv.grouping.base import GROUPING, Grouper


@GROUPING.register("none")
@dataclasses.dataclass(frozen=True)
class NoGrouping(Grouper):
    name: ClassVar[str] = "none"
    stores_assignments: ClassVar[bool] = False

    def group(self, x, init=None, *, backend="auto"):
        return None
