"""Batched Lloyd k-means over [N, S, D] in torch, and the ``kmeans`` grouper.

- Init: k-means++ (D^2 sampling, seeded; drawn from a random subsample of ``INIT_SAMPLE`` tokens
  per cluster on long spans, since its C sequential passes dominate otherwise) or uniform random
  tokens (the reference QVG's choice). The Lloyd iterations always use every token.
- Warm start from given centroids (e.g. the previous chunk's).
- Deterministic for a given seed: sums are fixed-order matmuls, sampling uses a seeded generator.
- Each row stops on its own once its objective improves by less than ``tol`` (relative); frozen
  rows keep their result, so a row's outcome does not depend on the other rows of the batch. The
  host checks for "all rows done" only every ``CHECK_EVERY`` iterations, and only while at least
  ``CHECK_EVERY`` iterations remain (the presets' 5 iterations run without a check): stopping
  early only saves time, the result is the same.
- Empty clusters are re-seeded with far tokens: the farthest token of each of the farthest span
  segments (distinct tokens, the span's farthest first; no host sync).
- Fewer tokens than clusters: every token gets its own cluster (C = S, exact).
- Works on a power-of-two-normalized copy of each row (:func:`qkv.grouping.base.row_scale`), so
  distances never overflow.
The objective never increases, and every token ends assigned to its nearest centroid (with the
Triton assignment: its nearest centroid rounded to bf16, see docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from qkv import kernels
from qkv.component import check_choice, check_int
from qkv.errors import ConfigError, shown
from qkv.grouping.base import GROUPING, ClusteringGrouper, Groups, row_scale

CHECK_EVERY = 4
FAR_SEGMENTS = 4  # empty clusters are re-seeded from the farthest of 4 x clusters span segments
INIT_SAMPLE = 16  # k-means++ seeds from at most this many tokens per cluster (a random subsample)
INITS = ("kmeans++", "random")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """centroids [N, C, D] fp32, assignments [N, S] int64 (nearest centroid), objective
    [iterations + 1, N] fp64: sum of squared distances after each assignment step (last = final)."""

    centroids: torch.Tensor
    assignments: torch.Tensor
    objective: torch.Tensor


def _init_random(x: torch.Tensor, clusters: int, gen: torch.Generator) -> torch.Tensor:
    n, s, _ = x.shape
    idx = torch.randint(s, (n, clusters), generator=gen, device=x.device)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])).float()


def _init_kmeanspp(x: torch.Tensor, clusters: int, gen: torch.Generator) -> torch.Tensor:
    n, s, d = x.shape
    if s > INIT_SAMPLE * clusters:  # seed from a random subsample; Lloyd then uses every token
        keep = torch.rand(n, s, generator=gen, device=x.device).argsort(-1)[:, : INIT_SAMPLE * clusters]
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, d))
        s = x.shape[1]
    x = x.float()
    rows = torch.arange(n, device=x.device)
    first = torch.randint(s, (n,), generator=gen, device=x.device)
    centroids = torch.empty(n, clusters, d, device=x.device, dtype=x.dtype)
    centroids[:, 0] = x[rows, first]
    nearest = (x - centroids[:, :1]).square().sum(-1)  # [N, S]
    for j in range(1, clusters):
        total = nearest.sum(-1, keepdim=True)
        weights = torch.where(total > 0, nearest, torch.ones_like(nearest))
        pick = torch.multinomial(weights, 1, generator=gen).squeeze(-1)
        centroids[:, j] = x[rows, pick]
        nearest = torch.minimum(nearest, (x - centroids[:, j : j + 1]).square().sum(-1))
    return centroids


def _far_tokens(dist: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] distinct token indices, farthest first: the farthest token of each of the k
    farthest of ``FAR_SEGMENTS * k`` equal segments of the span (exactly the k farthest tokens
    when the span has no more tokens than segments; a few tail tokens beyond the last whole
    segment are not considered). One pass over ``dist`` instead of a top-k over every token."""
    n, s = dist.shape
    size = s // (FAR_SEGMENTS * k)
    if size <= 1:
        return dist.topk(k, dim=-1).indices
    heads, where = dist[:, : s - s % size].view(n, -1, size).max(-1)  # [N, segments]
    top = heads.topk(k, dim=-1).indices
    return torch.gather(where, 1, top).add_(top, alpha=size)


def kmeans(
    x: torch.Tensor,
    clusters: int,
    iters: int,
    *,
    tol: float = 1e-4,
    init: str = "kmeans++",
    seed: int = 0,
    init_centroids: torch.Tensor | None = None,
    backend: str = "auto",
) -> KMeansResult:
    """Batched k-means of ``x`` [N, S, D] (any float dtype; computed in fp32, read in place)
    into ``min(clusters, S)`` clusters per row.

    ``iters`` Lloyd iterations at most (0: only the initial assignment); ``init_centroids``
    [N, C, D] replaces the seeded init (warm start).
    """
    n, s, d = x.shape
    scale = row_scale(x)
    xs = x if scale is None else x / scale
    if init_centroids is not None:
        if init_centroids.shape[0] != n or init_centroids.shape[2] != d:
            raise ConfigError(
                f"kmeans: warm-start centroids {tuple(init_centroids.shape)} do not match "
                f"tokens {tuple(x.shape)}"
            )
        centroids = init_centroids.float().to(x.device)
        centroids = centroids if scale is None else centroids / scale
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        k = min(clusters, s)
        centroids = (_init_kmeanspp if init == "kmeans++" else _init_random)(xs, k, gen)
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    history = []
    for it in range(iters):
        assign, dist = kernels.kmeans_assign(xs, centroids, backend=backend)
        objective = dist.sum(-1)
        if history:  # improved by less than tol (relative) since the last step: done
            done |= history[-1] <= objective * (1 + tol)
        history.append(objective)
        # empty clusters move onto far tokens (no host sync)
        far = _far_tokens(dist, min(centroids.shape[1], s))
        means, _ = kernels.kmeans_update(xs, assign, centroids, far, backend=backend)
        centroids = torch.where(done.view(-1, 1, 1), centroids, means)
        # a read-back stalls the GPU's queue: worth it only while it can skip CHECK_EVERY iterations
        if (it + 1) % CHECK_EVERY == 0 and iters - (it + 1) >= CHECK_EVERY and bool(done.all()):
            break
    assign, dist = kernels.kmeans_assign(xs, centroids, backend=backend)
    history.append(dist.sum(-1))
    objective = torch.stack(history).double()  # fp64: squared distances of huge inputs
    if scale is None:
        return KMeansResult(centroids, assign, objective)
    return KMeansResult(centroids * scale, assign, objective * scale.view(1, -1).double().square())


@GROUPING.register("kmeans")
@dataclasses.dataclass(frozen=True)
class KMeansGrouper(ClusteringGrouper):
    """k-means in torch (see module docstring). Spec: ``kmeans(clusters=256,iters=5)``.

    The defaults are the qvg presets' (256 clusters, 5 Lloyd iterations from random tokens), so a
    spec such as ``kmeans(clusters=128),centroid,int2`` costs what a preset costs. k-means++ seeding
    (``init=kmeans++``) and more iterations lower the error by a few percent at several times the
    time (rows ``qvg+kmeans++`` and ``qvg-ref`` of ``qkv eval``, docs/eval.md).
    """

    name: ClassVar[str] = "kmeans"
    iters: int = 5
    tol: float = 1e-4
    init: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("kmeans", "iters", self.iters, 0)
        check_int("kmeans", "seed", self.seed, 0, SEED_MAX)
        check_choice("kmeans", "init", self.init, INITS)
        if not isinstance(self.tol, (int, float)) or isinstance(self.tol, bool) or not 0 <= self.tol < math.inf:
            raise ConfigError(f"kmeans: tol must be a finite number >= 0, got {shown(self.tol)}")

    def group(self, x, init=None, *, backend="auto") -> Groups:
        result = kmeans(
            x,
            self.clusters,
            self.iters,
            tol=self.tol,
            init=self.init,
            seed=self.seed,
            init_centroids=init,
            backend=backend,
        )
        return Groups(result.centroids, result.assignments)
