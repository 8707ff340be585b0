"""Residual staging: how many times grouping + smoothing run before the final quantization.

- ``single``: one stage (QVG, and every policy without residual stages).
- ``progressive(stages=T)``, T >= 2: stage t groups and smooths the residual left by stage t-1,
  coarse to fine (QVG-Pro uses T = 4). Only intermediate residuals are dropped; every stage's
  centroids and assignments are stored, and decoding adds them all back.

The last stage's subtraction can be deferred to the quantize+pack kernel
(``run(..., defer_last=True)``) when the smoother subtracts stored centroids
(:meth:`~qkv.quantizers.smoothing.Smoother.offsets`): the final residual is then never written
out; for one stage, the kernel reads the input itself in its own dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from qkv.component import Component, check_int
from qkv.dtypes import compact_index_dtype
from qkv.errors import ConfigError
from qkv.format import MAX_STAGES
from qkv.grouping.base import Grouper
from qkv.quantizers.smoothing import Smoother
from qkv.registry import Registry

STAGING: Registry["Staging"] = Registry("staging")

# per stage: (stored centroids [N, C, D] or None, assignments to store [N, S] or None)
Stored = list[tuple[torch.Tensor | None, torch.Tensor | None]]
# the last stage's deferred subtraction: (stored centroids [N, C, D], assignments [N, S]) or None
Pending = tuple[torch.Tensor, torch.Tensor] | None


@dataclasses.dataclass(frozen=True)
class Staging(Component):
    @property
    def count(self) -> int:
        """Number of grouping + smoothing stages."""
        return 1

    @property
    def defers_last(self) -> bool:
        """Whether :meth:`run` accepts ``defer_last``: True for this loop; a subclass that
        overrides ``run`` keeps the unfused path unless it overrides this too (and honours
        ``defer_last``)."""
        return type(self).run is Staging.run

    # whether :meth:`run` accepts ``peaks`` (the rows' max |x|, known to the caller): as for
    # ``defer_last``, this loop does and a subclass that overrides ``run`` does not
    takes_peaks = defers_last

    def run(
        self,
        x: torch.Tensor,
        grouper: Grouper,
        smoother: Smoother,
        warm: Sequence[torch.Tensor] | None = None,
        *,
        backend: str = "auto",
        defer_last: bool = False,
        peaks: torch.Tensor | None = None,
        found=None,
    ) -> tuple[torch.Tensor, Stored] | tuple[torch.Tensor, Stored, Pending]:
        """Run every stage on ``x`` [N, S, D] (fp32/fp16/bf16; the first stage reads it as it is).

        ``warm``: per-stage initial centroids [N, C, D] (warm start), or None. ``peaks``: each
        row's max |x| ([N] fp32) if known, for the first stage's grouper if it takes them
        (:attr:`~qkv.grouping.base.Grouper.takes_peaks`); ``found``: for that grouper to call with
        the peaks where it measures them instead (:meth:`~qkv.grouping.base.Grouper.measures_peaks`).
        Returns (final residual [N, S, D], per stage (stored centroids, assignments to store or
        None)); the residual is fp32 after any smoothing but ``none``, which passes x through.

        ``defer_last=True``: if the smoother reports its last subtraction (``offsets`` is not
        None), it is not done; returns (residual *before* the last stage's subtraction, stored,
        pending) with ``pending = (stored centroids [N, C, D], assignments [N, S])`` of the last
        stage, for ``kernels.quantize_pack(residual, ..., centroids=[c], assignments=[a])``, which
        quantizes exactly the residual the unfused path would have produced. Otherwise ``pending``
        is None and the residual is final. Earlier stages always materialize their residuals (the
        next grouping reads them).
        """
        if warm is not None and len(warm) != self.count:
            raise ConfigError(f"{self.token}: warm start has {len(warm)} stages, expected {self.count}")
        residual, stored, pending = x, [], None
        for t in range(self.count):
            groups = None
            if smoother.needs_groups:
                given = {"peaks": peaks, "found": found} if t == 0 and grouper.takes_peaks else {}
                known = {key: value for key, value in given.items() if value is not None}
                groups = grouper.group(residual, None if warm is None else warm[t], backend=backend, **known)
            if defer_last and t == self.count - 1:
                pending = smoother.offsets(residual, groups, backend=backend)
            if pending is None:
                residual, centroids = smoother.forward(residual, groups, backend=backend)
            else:
                centroids = pending[0]
            keep = groups is not None and grouper.stores_assignments
            assign = None
            if keep:
                assign = groups.assignments.to(compact_index_dtype(groups.centroids.shape[1]))
            stored.append((centroids, assign))
            if pending is not None and assign is not None and pending[1] is groups.assignments:
                pending = (centroids, assign)  # same values, 1-2 bytes a token for the kernel to read
        return (residual, stored, pending) if defer_last else (residual, stored)


@STAGING.register("single")
@dataclasses.dataclass(frozen=True)
class SingleStage(Staging):
    name: ClassVar[str] = "single"


@STAGING.register("progressive")
@dataclasses.dataclass(frozen=True)
class ProgressiveResidual(Staging):
    """Spec: ``progressive(stages=4)``."""

    name: ClassVar[str] = "progressive"
    stages: int = 2

    def __post_init__(self) -> None:
        if self.stages == 1:
            raise ConfigError("progressive: stages must be >= 2; one stage is the 'single' staging")
        check_int("progressive", "stages", self.stages, 2, MAX_STAGES)

    @property
    def count(self) -> int:
        return self.stages
