"""What a grouping strategy is: it partitions the S tokens of each (batch, head) row into groups
and gives each group a centroid (the mean of its tokens, or the k-means centre)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv.component import Component, check_int
from qkv.format import BlockGrid
from qkv.registry import Registry

GROUPING: Registry["Grouper"] = Registry("grouping")


@dataclasses.dataclass(frozen=True)
class Groups:
    """centroids: [N, C, D] fp32; assignments: [N, S] int64 group index of every token."""

    centroids: torch.Tensor
    assignments: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Grouper(Component):
    """Base class.

    ``grouped``: it partitions tokens (False only for ``none``); ``stores_assignments``: the
    assignments are stored (False when they follow from S alone: then :attr:`grid` describes them,
    or there is one group for every token).
    """

    grouped: ClassVar[bool] = True
    stores_assignments: ClassVar[bool] = True
    # whether :meth:`group` takes ``peaks=`` ([N] fp32 max |x| of each row, when the caller has
    # read them already: a checked compression's value check), so that it need not read x for them,
    # and ``found=`` (a callable given those peaks where the grouping measured them: see
    # :meth:`measures_peaks`)
    takes_peaks: ClassVar[bool] = False
    # whether :meth:`group` draws random numbers when it is not warm-started (a seeded start: a
    # CUDA graph could not replay it, see qkv.caches.encode_graphs)
    draws_cold: ClassVar[bool] = False

    @property
    def grid(self) -> BlockGrid | None:
        """The grid that implies the assignments of a grouper that does not store them."""
        return None

    def measures_peaks(self, warm: bool) -> bool:
        """Whether :meth:`group` (warm-started or not), given no ``peaks``, measures each row's
        max |x| in a pass that reads every token anyway and hands them to ``found``."""
        return False

    def predicted_groups(self, tokens: int) -> int:
        """Groups a fresh (not warm-started) grouping of ``tokens`` tokens makes."""
        raise NotImplementedError

    def group(
        self, x: torch.Tensor, init: torch.Tensor | None = None, *, backend: str = "auto"
    ) -> Groups:
        """Group the tokens of ``x`` [N, S, D] (fp32); ``init`` [N, C, D] warm-starts centroids."""
        raise NotImplementedError



@dataclasses.dataclass(frozen=True)
class ClusteringGrouper(Grouper):
    """Base of the groupers that cluster into at most ``clusters`` groups (k-means, FAISS)."""

    draws_cold: ClassVar[bool] = True
    clusters: int = 256

    def __post_init__(self) -> None:
        check_int(self.name, "clusters", self.clusters, 1)

    def predicted_groups(self, tokens: int) -> int:
        return min(self.clusters, tokens)


# Rows whose max-abs lies in [2**SAFE_LOW, 2**SAFE_HIGH] are clustered as they are (factor 1):
# scaling by a power of two commutes exactly with every operation that neither overflows nor
# underflows, so the result is the same as on a normalized copy.
SAFE_LOW, SAFE_HIGH = -20, 40


def row_factor(x: torch.Tensor, peaks: torch.Tensor | None = None) -> torch.Tensor:
    """Power of two per row of ``x`` [N, S, D] that its values are multiplied by: [N] fp32, 1 for a
    row in the safe range and, for a row outside it, the one that brings its max-abs into
    [0.5, 1) (at most 2**126: a subnormal row's max ends a little lower). A row's factor
    depends on that row alone, and nothing is read back to the host. ``peaks``: the rows' max |x|
    ([N] fp32) if the caller has them (then ``x`` is not read).
    Groupers cluster x times its factor (the k-means ops take it as ``scale``, so no scaled copy
    is made), so squared distances never overflow or underflow, and divide the centroids by it."""
    peak = torch.linalg.vector_norm(x.flatten(1), ord=float("inf"), dim=-1).float() if peaks is None else peaks
    exponent = torch.frexp(peak).exponent  # peak = m * 2**exponent, m in [0.5, 1); 0 for peak 0
    safe = (exponent >= SAFE_LOW) & (exponent <= SAFE_HIGH)
    return torch.where(safe, 0, -exponent).clamp_max(126).float().exp2()  # 2**126: fp32's largest power below inf
