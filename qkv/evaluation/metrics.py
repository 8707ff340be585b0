"""Quality metrics for reconstructions, accumulated in fp64 over many tensors."""

from __future__ import annotations

import dataclasses
import math

import torch

# Elements per fp64 slice: the sums never materialize a whole tensor in fp64 (8 MB temporaries,
# which the allocator reuses, instead of a fresh multi-GB copy per tensor on Wan's layers).
SLICE = 1 << 20


def relative_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """||x_hat - x||^2 / ||x||^2 (fp64)."""
    return ErrorSum().add(x, x_hat).relative_mse


def snr_db(rel_mse: float) -> float:
    """Signal-to-noise ratio in dB of a relative MSE (inf when exact)."""
    return math.inf if rel_mse == 0 else -10 * math.log10(rel_mse)


@dataclasses.dataclass
class ErrorSum:
    """Running sums of squared error and squared signal over several tensors."""

    error: float = 0.0
    signal: float = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> "ErrorSum":
        """Add ``x`` and its reconstruction ``x_hat`` (same shape, any float dtypes), in fp64."""
        x, x_hat = x.reshape(-1), x_hat.reshape(-1)
        for start in range(0, x.numel(), SLICE):
            x64 = x[start : start + SLICE].double()
            self.error += float((x_hat[start : start + SLICE].double() - x64).square().sum())
            self.signal += float(x64.square().sum())
        return self

    @property
    def relative_mse(self) -> float:
        return self.error / self.signal if self.signal else float(self.error > 0)
