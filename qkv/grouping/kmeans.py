"""Batched Lloyd k-means over [N, S, D] in torch, and the ``kmeans`` grouper.

- Init: k-means++ (D^2 sampling, seeded; drawn from a random subsample of ``INIT_SAMPLE`` tokens
  per cluster on long spans, since its C sequential passes dominate otherwise), k-means|| (the
  same subsample; two rounds that each draw 2 C candidates at once by D^2, then weighted D^2
  sampling of the C centroids from the 4 C candidates in ``REDUCE_ROUNDS`` rounds of ~C / 32
  picks: 3 passes over the subsample, each batched over rows, and 32 over the candidates), or
  uniform random tokens (the reference QVG's choice). Both D^2 seedings draw from their points
  in one kernel on a GPU (:func:`qkv.kernels.kmeanspp`: k-means++ a pick a pass, k-means|| a
  round a pass); no host sync. The Lloyd iterations always use every token.
- Finish (``finish``): ``"assign"`` (default) ends with one more assignment pass, so every token
  is assigned to its nearest final centroid; ``"update"`` ends with the last iteration's update,
  as the reference QVG and flash-kmeans do: the last pass's assignments with their clusters'
  means as centroids (each the best centroid for its tokens, a token not always at its nearest),
  one assignment pass fewer a call (``benchmarks/kmeans_finish.py``, docs/policies.md).
- Warm start from given centroids (e.g. the previous chunk's).
- Deterministic for a given seed: sums are fixed-order matmuls, sampling uses a seeded generator
  whose every draw is shared by all rows, so a row's result depends only on its own tokens and the
  seed: heads clustered in one call get what each would get alone (one call per span, not per head).
- Each row stops on its own once its objective improves by less than ``tol`` (relative); frozen
  rows keep their result, so a row's outcome does not depend on the other rows of the batch. The
  host asks whether all rows are done only every ``CHECK_EVERY`` iterations, and only while at
  least ``CHECK_EVERY`` iterations remain (the presets' 5 iterations run without a check), and
  never waits for the answer (:class:`~qkv.readback.Arriving`: on a GPU it stops at a later check
  after the answer arrived; off one, at once): stopping early only saves time, the result is the
  same, and an encode makes no host sync.
- Empty clusters are re-seeded with far tokens: the farthest token of each of the farthest span
  segments (distinct tokens, the span's farthest first; no host sync).
- Fewer tokens than clusters: every token gets its own cluster (C = S, exact).
- Works on each row times a power of two (:func:`qkv.grouping.base.row_factor`: 1 for rows in
  the safe range), applied as the k-means ops read the tokens (no scaled copy, no host read-back),
  so distances never overflow. The factor comes from the rows' max |x|: given by the caller (a
  checked compression's value check read them), or measured by the first assignment pass, which
  takes every factor to be 1 and is run again, in place, for the rows where that was wrong (the
  seeded or warm-start centroids scaled then, exactly as the seeding would have scaled them), so
  no separate pass over the tokens reads them; only k-means++ and k-means|| seedings, which need
  the factors first, read the peaks in a reduction of their own.
The objective never increases, and with ``finish="assign"`` every token ends assigned to its nearest
centroid (with the Triton assignment: its nearest centroid rounded to bf16, see docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from qkv import kernels
from qkv.kernels.kmeans import scaled_rows
from qkv.component import check_choice, check_int
from qkv.errors import ConfigError, shown
from qkv.grouping.base import GROUPING, ClusteringGrouper, Groups, row_factor
from qkv.readback import Arriving

CHECK_EVERY = 4
FAR_SEGMENTS = 4  # empty clusters are re-seeded from the farthest of 4 x clusters span segments
INIT_SAMPLE = 16  # k-means++ and k-means|| seed from at most this many tokens per cluster (a random subsample)
# k-means|| sampling rounds (one assignment pass of the subsample each) and candidates per round, in
# clusters: 2 rounds of 2 C seeded as well as 4 of C on real K/V, in fewer passes
# (benchmarks/seeding_quality.py --oversample, docs/policies.md)
PARALLEL_ROUNDS = 2
PARALLEL_OVERSAMPLE = 2
# k-means|| draws its centroids from the weighted candidates by D^2 in this many rounds after the
# first pick (~C / 32 picks a round, a pass over the candidates each; C rounds of one pick, plain
# weighted k-means++, seeded no better: benchmarks/seeding_quality.py)
REDUCE_ROUNDS = 32
INITS = ("kmeans++", "kmeans||", "random")
FINISHES = ("assign", "update")
SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """centroids [N, C, D] fp32, assignments [N, S] int64, objective [passes, N] fp64: the sum of
    squared distances after each assignment pass (``finish="assign"``: iterations + 1 passes, the
    last one's the result's; ``"update"``: one a Lloyd iteration, the last one's only lowered by
    the final means), or None where :func:`kmeans` was not asked for it."""

    centroids: torch.Tensor
    assignments: torch.Tensor
    objective: torch.Tensor | None


def _init_random(x: torch.Tensor, clusters: int, gen: torch.Generator, backend: str,
                 factor: torch.Tensor | None = None) -> torch.Tensor:
    """``clusters`` tokens of each row (the same positions in every row), times ``factor``."""
    n, s, _ = x.shape
    idx = torch.randint(s, (1, clusters), generator=gen, device=x.device).expand(n, -1)
    return scaled_rows(torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])), factor)


def _subsample(x: torch.Tensor, clusters: int, gen: torch.Generator, factor: torch.Tensor | None) -> torch.Tensor:
    """At most ``INIT_SAMPLE * clusters`` distinct tokens of each row of ``x`` [N, S, D], drawn at
    random (every token when the span has no more), times the rows' ``factor`` in ``x``'s own
    dtype: a power of two, so the product is exact wherever the fp32 one is (bf16 shares fp32's
    range; an fp16 row's factor only scales a row of tiny values up). Seeding reads these (16-bit
    tokens at half the bytes of fp32, their products exact on the tensor cores), Lloyd every token."""
    n, s, d = x.shape
    if s > INIT_SAMPLE * clusters:
        keep = torch.rand(1, s, generator=gen, device=x.device).argsort(-1)[:, : INIT_SAMPLE * clusters].expand(n, -1)
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, d))
    return x if factor is None else x * factor.view(-1, 1, 1).to(x.dtype)


def _init_kmeanspp(x: torch.Tensor, clusters: int, gen: torch.Generator, backend: str,
                   factor: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ on a subsample of each row times ``factor`` (every token weighs 1): :func:`_reduce`
    a pick a round."""
    x = _subsample(x, clusters, gen, factor)
    return _reduce(x, torch.ones(x.shape[:2], device=x.device), clusters, clusters, gen, backend)


def _weighted_draw(weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """[N, k] distinct indices into ``weights`` [N, M] (k <= M), drawn without replacement with
    probability proportional to the weights (Efraimidis-Spirakis: the k largest ``w / E``,
    E ~ Exp(1), one E per column shared by every row, so a row's draw does not depend on the other
    rows). Weights of 0 come after every positive one, negative ones last."""
    wait = torch.empty_like(weights[:1]).exponential_(generator=gen).clamp_min_(torch.finfo(weights.dtype).tiny)
    return (weights / wait).topk(k, dim=-1).indices


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [N, M, D], idx [N, K] -> x[n, idx[n, k]], [N, K, D]."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _init_parallel(x: torch.Tensor, clusters: int, gen: torch.Generator, backend: str,
                   factor: torch.Tensor | None = None) -> torch.Tensor:
    """k-means|| (Bahmani et al. 2012) on a subsample of ``INIT_SAMPLE * clusters`` tokens per row
    (times ``factor``).

    One uniform token, then ``PARALLEL_ROUNDS`` rounds that each draw ``PARALLEL_OVERSAMPLE *
    clusters`` new distinct candidates at once (the last one fewer, so that the candidates are a
    power of two: the reduction's rows hold no padding) with probability proportional to the
    squared distance to the nearest candidate so far (one assignment pass per round); each
    candidate is weighted by the subsample tokens nearest to it. :func:`_reduce` then draws the
    ``clusters`` centroids from the candidates. Shapes depend only on the input's shape; no host
    syncs.
    """
    x = _subsample(x, clusters, gen, factor)
    n, m, _ = x.shape
    per_round = PARALLEL_OVERSAMPLE * clusters
    rounds = 1 + min(clusters - 1, REDUCE_ROUNDS)
    if m <= PARALLEL_ROUNDS * per_round:  # no more tokens than candidates: all are candidates
        return _reduce(x, torch.ones(n, m, device=x.device), clusters, rounds, gen, backend)
    first = torch.randint(m, (1, 1), generator=gen, device=x.device).expand(n, 1)
    candidates = [_gather_rows(x, first)]
    owner, nearest = kernels.kmeans_assign(x, candidates[0].float(), backend=backend)
    taken = torch.zeros(n, m, dtype=torch.bool, device=x.device).scatter_(1, first, True)
    for r in range(PARALLEL_ROUNDS):
        count = per_round - (r == PARALLEL_ROUNDS - 1)
        if not count:  # one cluster: the last round has no candidate to draw
            break
        pick = _weighted_draw(nearest.masked_fill(taken, -1.0), count, gen)  # untaken first
        taken.scatter_(1, pick, True)
        candidates.append(_gather_rows(x, pick))
        idx, dist = kernels.kmeans_assign(x, candidates[-1].float(), backend=backend)
        owner = torch.where(dist < nearest, idx + 1 + r * per_round, owner)
        nearest = torch.minimum(nearest, dist)
    pool = torch.cat(candidates, 1)  # [N, rounds * per_round, D]
    ones = torch.ones_like(nearest)  # counts below 2**24 are exact in any summation order
    weights = torch.zeros(n, pool.shape[1], device=x.device).scatter_add_(1, owner, ones)
    return _reduce(pool, weights, clusters, rounds, gen, backend)


def _reduce(
    pool: torch.Tensor, weights: torch.Tensor, clusters: int, rounds: int, gen: torch.Generator, backend: str
) -> torch.Tensor:
    """``clusters`` centroids [N, C, D] drawn from the weighted points ``pool`` [N, K, D]
    (K >= C), ``weights`` [N, K] (> 0 for every point that a token is nearest to): weighted D^2
    sampling in ``rounds`` rounds (:func:`qkv.kernels.kmeanspp`: a pass of the K points against a
    round's picks each; ``rounds = clusters``: k-means++; one kernel on a GPU), with one
    exponential draw per point and round shared by every row."""
    draws = torch.empty(rounds, pool.shape[1], device=pool.device).exponential_(generator=gen)
    draws.clamp_min_(torch.finfo(draws.dtype).tiny)  # a key is score / draw
    return _gather_rows(pool, kernels.kmeanspp(pool, weights, draws, clusters, backend=backend)).float()


SEEDINGS = {"kmeans++": _init_kmeanspp, "kmeans||": _init_parallel, "random": _init_random}


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
    peaks: torch.Tensor | None = None,
    found=None,
    finish: str = "assign",
    objective: bool = True,
) -> KMeansResult:
    """Batched k-means of ``x`` [N, S, D] (any float dtype; computed in fp32, read in place)
    into ``min(clusters, S)`` clusters per row.

    ``iters`` Lloyd iterations at most (0: only the initial assignment); ``init_centroids``
    [N, C, D] replaces the seeded init (warm start); ``peaks``: each row's max |x| ([N] fp32), if
    known (see :func:`row_factor`; otherwise the first assignment pass measures them as it reads
    the tokens, or with a k-means++ or k-means|| seeding, which needs the rows' factors first, a
    reduction of their own reads them); ``found``: called with the peaks ([N] fp32, NaN and Inf
    propagating) where the first pass measured them; ``finish``: ``"assign"`` ends with an assignment pass to the
    final centroids, ``"update"`` with the last iteration's means of its assignments (the
    reference's; with ``iters=0`` both are the initial assignment); ``objective=False`` leaves the
    result's objective None (the sums after the last pass and the history's stacking are not
    launched: a grouping, which stores only the centroids and assignments, does not ask for them).
    """
    check_choice("kmeans", "init", init, INITS)
    check_choice("kmeans", "finish", finish, FINISHES)
    n, s, d = x.shape
    # [N]; the k-means ops multiply each token by it as they read it. Unless the caller knows the
    # rows' peaks or the seeding needs the factor, the first assignment pass takes it to be 1 and
    # measures the peaks as it reads the tokens; the rows it got wrong are assigned again (assign_pass)
    factor = None if peaks is None and (init_centroids is not None or init == "random") else row_factor(x, peaks)
    if init_centroids is not None:
        if init_centroids.shape[0] != n or init_centroids.shape[2] != d:
            raise ConfigError(
                f"kmeans: warm-start centroids {tuple(init_centroids.shape)} do not match "
                f"tokens {tuple(x.shape)}"
            )
        centroids = scaled_rows(init_centroids.to(x.device), factor)
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        k = min(clusters, s)
        centroids = SEEDINGS[init](x, k, gen, backend, factor)

    def assign_pass(sums: bool) -> tuple:
        """An assignment pass of the centroids (the first one settles the factor if it is unknown)."""
        nonlocal factor, centroids
        if factor is not None:
            return kernels.kmeans_assign(x, centroids, scale=factor, sums=sums, backend=backend)
        # the factor 1 passed as one (not left out), so the rows of factor 1 compute as they will
        # in the later passes, bit for bit
        ones = torch.ones(n, device=x.device)
        *first, measured = kernels.kmeans_assign(x, centroids, scale=ones, sums=sums, peaks=True, backend=backend)
        if found is not None:
            found(measured)
        factor = row_factor(x, measured)
        centroids = scaled_rows(centroids, factor)  # what the seeding would have given with it
        return kernels.kmeans_assign(x, centroids, scale=factor, sums=sums, redo=tuple(first), backend=backend)

    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    all_done = None  # the last "all rows done" on its way to the host
    history = []
    assign = None  # the last pass's assignments
    for it in range(iters):
        # the clusters' sums from the same pass where the kernel gathers them (few clusters)
        assign, dist, sums = assign_pass(sums=True)
        total = dist.sum(-1)
        if history:  # improved by less than tol (relative) since the last step: done
            done |= history[-1] <= total * (1 + tol)
        history.append(total)
        means, counts = kernels.kmeans_update(x, assign, centroids, scale=factor, sums=sums, backend=backend)
        # empty clusters move onto far tokens (no host sync; a row without one skips the search)
        far = kernels.kmeans_far(dist, min(centroids.shape[1], s), FAR_SEGMENTS, counts=counts, backend=backend)
        means = kernels.kmeans_reseed(means, counts, x, far, scale=factor, backend=backend)
        centroids = torch.where(done.view(-1, 1, 1), centroids, means)
        # worth asking only while an answer can skip CHECK_EVERY iterations; one question at a time;
        # none while a CUDA graph is captured (a replay would act on the capture's answer)
        if ((it + 1) % CHECK_EVERY == 0 and iters - (it + 1) >= CHECK_EVERY and (all_done is None or all_done.ready())
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            if all_done is not None and all_done.values():  # done then: frozen since
                break
            all_done = Arriving(done.all())
            if all_done.ready() and all_done.values():  # off a GPU the answer is at hand
                break
    if finish == "assign" or assign is None:
        assign, dist = assign_pass(sums=False)
        if objective:
            history.append(dist.sum(-1))
    if not objective:
        return KMeansResult(centroids / factor.view(-1, 1, 1), assign, None)
    totals = torch.stack(history).double() / factor.view(1, -1).double().square()  # fp64: huge inputs
    return KMeansResult(centroids / factor.view(-1, 1, 1), assign, totals)


@GROUPING.register("kmeans")
@dataclasses.dataclass(frozen=True)
class KMeansGrouper(ClusteringGrouper):
    """k-means in torch (see module docstring). Spec: ``kmeans(clusters=256,iters=5)``.

    The defaults are the qvg presets' (256 clusters, 5 Lloyd iterations from random tokens), so a
    spec such as ``kmeans(clusters=128),centroid,int2`` costs what a preset costs. k-means++ seeding
    (``init=kmeans++``) and more iterations lower the error by a few percent at several times the
    time (rows ``qvg+kmeans++``, ``qvg+kmeans||`` and ``qvg-ref`` of ``qkv eval``, docs/eval.md);
    ``init=kmeans||`` seeds as well as k-means++ with 32 rounds of picks over 4 C candidates instead
    of C sequential picks over the 16 C tokens of k-means++'s subsample (docs/policies.md).
    ``warm_iters``: the Lloyd iterations of a warm-started grouping (a streaming cache seeds each
    span with the previous span's centroids; default ``iters``): warm centroids need fewer
    iterations for the same error (``benchmarks/warm_start_kmeans.py``, docs/policies.md).
    ``finish=update`` skips the final assignment pass (the reference's Lloyd iteration; see the
    module docstring): at equal iterations a little more error for one pass fewer, at equal passes
    less error (one update more).
    """

    name: ClassVar[str] = "kmeans"
    takes_peaks: ClassVar[bool] = True
    iters: int = 5
    tol: float = 1e-4
    init: str = "random"
    seed: int = 0
    warm_iters: int | None = None
    finish: str = "assign"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("kmeans", "iters", self.iters, 0)
        if self.warm_iters is not None:
            check_int("kmeans", "warm_iters", self.warm_iters, 0)
        check_int("kmeans", "seed", self.seed, 0, SEED_MAX)
        check_choice("kmeans", "init", self.init, INITS)
        check_choice("kmeans", "finish", self.finish, FINISHES)
        if not isinstance(self.tol, (int, float)) or isinstance(self.tol, bool) or not 0 <= self.tol < math.inf:
            raise ConfigError(f"kmeans: tol must be a finite number >= 0, got {shown(self.tol)}")

    def measures_peaks(self, warm: bool) -> bool:
        return warm or self.init == "random"

    def group(self, x, init=None, *, backend="auto", peaks=None, found=None) -> Groups:
        result = kmeans(
            x,
            self.clusters,
            self.iters if init is None or self.warm_iters is None else self.warm_iters,
            tol=self.tol,
            init=self.init,
            seed=self.seed,
            init_centroids=init,
            backend=backend,
            peaks=peaks,
            found=found,
            finish=self.finish,
            objective=False,
        )
        return Groups(result.centroids, result.assignments)
