"""Which policies the evaluation runs on a dataset: every preset, presets fitted to the bit
budget of RTN (matched bits), and bit-width sweeps that trace each family's quality-memory curve."""

from __future__ import annotations

import dataclasses

import torch

from qkv.caches import Policy, build_policy, list_policies

CLUSTER_CHOICES = (256, 128, 64, 32, 16, 8, 4, 2)
FAMILY = {"qvg-int4": "qvg"}  # presets that are points of another preset's curve


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # preset plus overrides, e.g. "qvg(clusters=64)"
    family: str  # the preset
    group: str  # "preset", "matched" or "sweep"
    policy: Policy


def predicted_bits(policy: Policy, shapes: list[tuple[int, int, int, int]], dtype: torch.dtype) -> float:
    """Exact bits per element of K and V together over tensors of ``shapes``."""
    total = sum(p.predicted_nbytes(s, dtype) for s in shapes for p in (policy.k, policy.v))
    elements = 2 * sum(b * h * n * d for b, h, n, d in shapes)
    return 8 * total / elements


def entry(preset: str, group: str, **overrides: object) -> Entry:
    """``preset`` with ``overrides`` (a per-token block that does not divide a dataset's D, as 64
    for MiniLM's 32, is fitted to it by the quantizer: ``AffineQuantizer.block_for``)."""
    args = ",".join(f"{k}={v}" for k, v in overrides.items())
    return Entry(f"{preset}({args})" if args else preset, FAMILY.get(preset, preset), group,
                 build_policy(preset, **overrides))


def fit_clusters(preset: str, shapes, dtype, budget: float, group: str = "matched") -> Entry | None:
    """``preset`` with the most clusters (from ``CLUSTER_CHOICES``) within ``budget`` bits."""
    for clusters in CLUSTER_CHOICES:
        candidate = entry(preset, group, clusters=clusters)
        if predicted_bits(candidate.policy, shapes, dtype) <= budget + 1e-9:
            return candidate
    return None


# From the reference's choices (qvg-ref) to qvg, one change at a time; the last step (2 -> 5
# k-means iterations) is qvg itself. The D^2 seedings (k-means++, k-means||) are measured as
# variants of qvg.
ABLATION = (
    ("qvg-ref+midrise", "kmeans(iters=2),centroid,int2(block=64)"),
    ("qvg+kmeans++", "kmeans(init=kmeans++),centroid,int2(block=64)"),
    ("qvg+kmeans||", "kmeans(init=kmeans||),centroid,int2(block=64)"),
)


def ablation_steps() -> list[Entry]:
    """qvg-ref -> qvg one step at a time, and qvg with each D^2 seeding."""
    return [Entry(name, "qvg-ref", "ablation", build_policy(spec)) for name, spec in ABLATION]


def build_suite(
    shapes: list[tuple[int, int, int, int]],
    dtype: torch.dtype,
    *,
    presets: list[str] | None = None,
    matched: bool = True,
    sweep: bool = True,
    ablation: bool = True,
) -> list[Entry]:
    """The policies to run on a dataset whose layers have ``shapes``."""
    entries = [entry(p, "preset") for p in presets or list_policies()]
    if matched:
        budget = predicted_bits(entry("rtn", "matched").policy, shapes, dtype)
        for preset in ("qvg", "qvg-ref"):
            fit = fit_clusters(preset, shapes, dtype, budget)
            if fit and all(fit.policy != e.policy for e in entries):
                entries.append(fit)
        entries.append(entry("kivi", "matched", scale="fp8"))
    if ablation:
        entries += ablation_steps()
    if sweep:
        for bits in (3, 4):
            entries += [entry("rtn", "sweep", bits=bits), entry("quarot", "sweep", bits=bits)]
            entries.append(entry("kivi", "sweep", scale="fp8", bits=bits))
        entries.append(entry("qvg", "sweep", bits=3))
    return entries
