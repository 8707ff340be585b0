"""Compressed K/V data: typed containers that know their exact size, component by component."""

from __future__ import annotations

import dataclasses

import torch

# The components every compressed tensor reports, in this order.
COMPONENTS = ("codes", "scales", "zeros", "centroids", "assignments", "fp_tokens")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclasses.dataclass(frozen=True)
class StageData:
    """One smoothing stage. centroids: [B, H, C, D] (stored format) or None; assignments:
    [B, H, S_q] uint8/int16/int32, or None when there are none or the grouper implies them."""

    centroids: torch.Tensor | None
    assignments: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    """One compressed K or V tensor of ``shape`` [B, H, S, D].

    The first ``quantized_tokens`` tokens (S_q) are quantized; the rest are ``fp_tokens``
    [B, H, S - S_q, D] kept in the input dtype (a full-precision window, or the tail that does not
    fill a per-channel block).

    codes: packed codes [B, H, R, P] (R = S_q for per-token blocks, R = D for per-channel
        blocks), or the values themselves [B, H, S_q, D] for a float-cast policy; None if S_q = 0.
    scales / zeros: [B, H, R, blocks per row] in the scale format; zeros only when asymmetric.
    scale_mult: [B, H] fp32 powers of two that scales and zeros are relative to (None for fp32).
    stages: per smoothing stage, its centroids and assignments.
    """

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    quantized_tokens: int
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    scale_mult: torch.Tensor | None
    stages: tuple[StageData, ...]
    fp_tokens: torch.Tensor | None

    def component_nbytes(self) -> dict[str, int]:
        """Exact bytes stored per component: codes, scales (with multipliers), zeros, centroids,
        assignments, fp_tokens."""
        return {
            "codes": _nbytes(self.codes),
            "scales": _nbytes(self.scales) + _nbytes(self.scale_mult),
            "zeros": _nbytes(self.zeros),
            "centroids": sum(_nbytes(s.centroids) for s in self.stages),
            "assignments": sum(_nbytes(s.assignments) for s in self.stages),
            "fp_tokens": _nbytes(self.fp_tokens),
        }

    @property
    def nbytes(self) -> int:
        """Exact bytes of everything stored."""
        return sum(self.component_nbytes().values())

    @property
    def numel(self) -> int:
        b, h, s, d = self.shape
        return b * h * s * d

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.numel

    def to(self, device: str | torch.device) -> "CompressedTensor":
        """A copy with every stored tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            codes=move(self.codes),
            scales=move(self.scales),
            zeros=move(self.zeros),
            scale_mult=move(self.scale_mult),
            stages=tuple(StageData(move(s.centroids), move(s.assignments)) for s in self.stages),
            fp_tokens=move(self.fp_tokens),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by a stable name (``codes``, ``stage0.centroids``, ...)."""
        out = {
            name: t
            for name, t in (
                ("codes", self.codes),
                ("scales", self.scales),
                ("zeros", self.zeros),
                ("scale_mult", self.scale_mult),
                ("fp_tokens", self.fp_tokens),
            )
            if t is not None
        }
        for i, stage in enumerate(self.stages):
            if stage.centroids is not None:
                out[f"stage{i}.centroids"] = stage.centroids
            if stage.assignments is not None:
                out[f"stage{i}.assignments"] = stage.assignments
        return out


@dataclasses.dataclass(frozen=True)
class CompressedKV:
    """Compressed keys and values of one span, plus the spec of the policy that made them."""

    k: CompressedTensor
    v: CompressedTensor
    spec: str

    @property
    def nbytes(self) -> int:
        """Exact bytes of everything stored, keys and values."""
        return self.k.nbytes + self.v.nbytes

    def component_nbytes(self) -> dict[str, int]:
        """Bytes per component, keys and values added up."""
        kb, vb = self.k.component_nbytes(), self.v.component_nbytes()
        return {name: kb[name] + vb[name] for name in kb}

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / (self.k.numel + self.v.numel)

    def to(self, device: str | torch.device) -> "CompressedKV":
        """A copy with every stored tensor on ``device``."""
        return CompressedKV(self.k.to(device), self.v.to(device), self.spec)

    def error_bound(self, policy=None, k_hat: torch.Tensor | None = None, v_hat: torch.Tensor | None = None):
        """Guaranteed bounds (:class:`qkv.bounds.KVBound`) on the reconstruction error of keys and
        values, computed from this data alone. ``policy``: the policy that compressed it (default:
        rebuilt from ``spec``, which needs every component registered)."""
        if policy is None:
            from qkv.caches.presets import build_policy

            policy = build_policy(self.spec)
        return policy.error_bound(self, k_hat, v_hat)

    def save(self, path) -> None:
        """Write to a signed safetensors file (see :mod:`qkv.caches.storage`); the folder must exist."""
        from qkv.caches.storage import save_compressed

        save_compressed(self, path)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "CompressedKV":
        """Read a file written by :meth:`save`; damaged, edited or mismatched files raise
        CorruptDataError (what is checked: :mod:`qkv.caches.storage`)."""
        from qkv.caches.storage import load_compressed

        return load_compressed(path, device=device)[0]
