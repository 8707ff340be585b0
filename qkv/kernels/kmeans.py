"""Plain-PyTorch reference of the k-means hot paths: nearest-centroid assignment, a
deterministic centroid update (no floating-point atomics: sums are fixed-order matmuls), weighted
k-means++ seeding, and the gather of each token's centroid that smoothing, quantization and
decoding share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk: bounds the [N, chunk, C] distance block instead of materializing [N, S, C].
CHUNK = 4096


def assign_torch(
    x: torch.Tensor, centroids: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every token.

    x: [N, S, D] (any float dtype, computed in fp32), times ``scale`` [N] (a power of two per row)
    when given; centroids: [N, C, D] fp32.
    Returns (assignments [N, S] int64, squared distance to the chosen centroid [N, S] fp32).
    Ties go to the lowest centroid index.
    """
    c_sq = centroids.square().sum(-1).unsqueeze(1)  # [N, 1, C]
    idx, dist = [], []
    for start in range(0, x.shape[1], CHUNK):
        xs = scaled_rows(x[:, start : start + CHUNK], scale)
        d = c_sq - 2 * torch.bmm(xs, centroids.transpose(1, 2))  # [N, s, C], minus |x|^2
        best, arg = d.min(-1)
        idx.append(arg)
        dist.append((best + xs.square().sum(-1)).clamp_min(0))
    return torch.cat(idx, 1), torch.cat(dist, 1)


def scaled_rows(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x in fp32, times ``scale`` [N] per row when given."""
    return x.float() if scale is None else x.float() * scale.view(-1, 1, 1)


def update_torch(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    reseed: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster; empty clusters take a re-seed token or keep their centroid.

    x: [N, S, D] (any float dtype, summed in fp32), times ``scale`` [N] when given; assignments: [N, S] int; centroids: [N, C, D]
    fp32 (previous); reseed: [N, K] token indices (K >= 1) or None: the j-th empty cluster of a
    row (in cluster order) moves onto token ``reseed[n, min(j, K - 1)]``; without it, empty
    clusters keep their previous centroid.
    Returns (new centroids [N, C, D] fp32, counts [N, C] fp32).
    """
    n, c, d = centroids.shape
    sums = torch.zeros(n, c, d, device=x.device, dtype=torch.float32)
    counts = torch.zeros(n, c, device=x.device, dtype=torch.float32)
    for start in range(0, x.shape[1], CHUNK):
        onehot = F.one_hot(assignments[:, start : start + CHUNK].long(), c).float()  # [N, s, C]
        sums += torch.bmm(onehot.transpose(1, 2), scaled_rows(x[:, start : start + CHUNK], scale))
        counts += onehot.sum(1)
    fallback = centroids.float()
    if reseed is not None:
        empty = counts == 0
        rank = (empty.long().cumsum(-1) - 1).clamp(0, reseed.shape[1] - 1)  # j-th empty -> j-th token
        tokens = torch.gather(reseed.long(), 1, rank)
        fallback = scaled_rows(torch.gather(x, 1, tokens.unsqueeze(-1).expand(-1, -1, d)), scale)
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    return torch.where(counts.unsqueeze(-1) > 0, means, fallback), counts


def kmeanspp_torch(points: torch.Tensor, weights: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Weighted k-means++ (D^2 sampling) over the points of each row: ``points`` [N, K, D] fp32,
    ``weights`` [N, K] fp32 (>= 0), ``draws`` [C] fp32 uniforms in [0, 1), C <= K, one per pick
    and shared by every row (so a row's picks depend only on its own points). Returns [N, C]
    int64: distinct point indices, in the order picked.

    Pick j takes the first point whose running sum of scores exceeds ``draws[j]`` times their
    total (the last point with a positive score if rounding carries the product to the total),
    where a point's score is its weight, times its squared distance to the nearest point picked
    so far from pick 1 on, and 0 once picked; when every score is 0 (all points left coincide
    with picked ones or weigh nothing), the first point not yet picked. Distances are
    ``sum((p - c)^2)`` in fp32, so a picked point (and a copy of it) is at distance 0 exactly."""
    n, k, _ = points.shape
    rows = torch.arange(n, device=points.device)
    index = torch.arange(k, device=points.device)
    taken = torch.zeros(n, k, dtype=torch.bool, device=points.device)
    nearest = torch.ones(n, k, device=points.device)  # pick 0 draws by weight alone
    picks = torch.empty(n, draws.shape[0], dtype=torch.int64, device=points.device)
    diff = torch.empty_like(points, dtype=torch.float32)  # one buffer for every pick's differences
    for j in range(draws.shape[0]):
        score = torch.where(taken, 0.0, weights * nearest)
        cdf = score.cumsum(-1)
        total = cdf[:, -1]
        pick = (cdf <= draws[j] * total[:, None]).sum(-1)
        pick = torch.minimum(pick, torch.where(score > 0, index, -1).amax(-1))
        pick = torch.where(total > 0, pick, (~taken).int().argmax(-1))
        picks[:, j] = pick
        taken[rows, pick] = True
        dist = torch.sub(points, points[rows, pick].unsqueeze(1), out=diff).square_().sum(-1)
        nearest = dist if j == 0 else torch.minimum(nearest, dist)
    return picks


def gather_centroids(centroids: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """centroids [N, C, D], assignments [N, S] -> each token's centroid, [N, S, D] fp32."""
    index = assignments.long().unsqueeze(-1).expand(-1, -1, centroids.shape[-1])
    return torch.gather(centroids.float(), 1, index)
