"""Quality metrics for reconstructions, accumulated in fp64 over many tensors."""

from __future__ import annotations

import dataclasses
import math

import torch


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
        x64 = x.double()
        self.error += float((x_hat.double() - x64).square().sum())
        self.signal += float(x64.square().sum())
        return self

    @property
    def relative_mse(self) -> float:
        return self.error / self.signal if self.signal else float(self.error > 0)
