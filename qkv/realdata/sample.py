"""One layer of real K/V material."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVSample:
    """One layer's cached keys and values from a real (or, for ``wan``, real-input) model run.

    Attributes:
        source: dataset name, e.g. ``"whisper-encoder"``.
        layer: layer index inside the model (0-based).
        k: keys, ``[1, H, S, D]`` float32 on the CPU.
        v: values, ``[1, H, S, D]`` float32 on the CPU.
        label: human-readable description for tables and plots; says "random weights" for ``wan``.
    """

    source: str
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    label: str
