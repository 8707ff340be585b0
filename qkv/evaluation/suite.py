"""Which policies the evaluation runs on a dataset: every preset, presets fitted to the bit
budget of RTN (matched bits), and bit-width sweeps that trace each family's quality-memory curve."""

from __future__ import annotations

import dataclasses

import torch

from qkv.caches import Policy, build_policy, list_policies
from qkv.caches.layout import predicted_nbytes

CLUSTER_CHOICES = (256, 128, 64, 32, 16, 8, 4, 2)


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    family: str
    group: str
    policy: Policy


def predicted_bits(policy: Policy, shapes: list[tuple[int, int, int, int]], dtype: torch.dtype) -> float:
    """Exact bits per element of K and V together over tensors of ``shapes``."""
    total = sum(predicted_nbytes(p, s, dtype) for s in shapes for p in (policy.k, policy.v))
    elements = 2 * sum(b * h * n * d for b, h, n, d in shapes)
    return 8 * total / elements


def fit_clusters(preset: str, shapes, dtype, budget: float) -> tuple[int, Policy] | None:
    """Most clusters (from ``CLUSTER_CHOICES``) that keep ``preset`` within ``budget`` bits."""
    for clusters in CLUSTER_CHOICES:
        policy = build_policy(preset, clusters=clusters)
        if predicted_bits(policy, shapes, dtype) <= budget + 1e-9:
            return clusters, policy
    return None


def build_suite(
    shapes: list[tuple[int, int, int, int]],
    dtype: torch.dtype,
    *,
    presets: list[str] | None = None,
    matched: bool = True,
    sweep: bool = True,
) -> list[Entry]:
    """The policies to run on a dataset whose layers have ``shapes``."""
    entries = [Entry(p, p, "preset", build_policy(p)) for p in presets or list_policies()]
    if matched:
        budget = predicted_bits(build_policy("rtn"), shapes, dtype)
        for preset in ("qvg", "qvg-ref"):
            fitted = fit_clusters(preset, shapes, dtype, budget)
            if fitted:
                clusters, policy = fitted
                entries.append(Entry(f"{preset}(clusters={clusters})", preset, "matched", policy))
        entries.append(Entry("kivi(scale=fp8)", "kivi", "matched", build_policy("kivi", scale="fp8")))
    if sweep:
        for bits in (3, 4):
            for family, base in (("rtn", {}), ("quarot", {}), ("kivi", {"scale": "fp8"})):
                overrides = {**base, "bits": bits}
                label = f"{family}({','.join(f'{k}={v}' for k, v in overrides.items())})"
                entries.append(Entry(label, family, "sweep", build_policy(family, **overrides)))
        entries.append(Entry("qvg(bits=3)", "qvg", "sweep", build_policy("qvg", bits=3)))
    return entries
