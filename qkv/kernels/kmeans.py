"""Plain-PyTorch reference of the k-means hot paths: nearest-centroid assignment, a
deterministic centroid update (no floating-point atomics: sums are fixed-order matmuls), weighted
D^2 sampling in rounds (k-means++ and k-means|| seeding), the far tokens that re-seed empty
clusters, and the gather of each token's centroid that smoothing, quantization and
decoding share."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Tokens per chunk: bounds the [N, chunk, C] distance block instead of materializing [N, S, C].
CHUNK = 4096


class ClusterSums(NamedTuple):
    """What the update adds, gathered by the assignment pass that read the tokens (``sums=True``):
    each cluster's sum of its tokens (times the row's scale) [N, P, C, D] fp32 and their count
    [N, P, C] fp32, in P parts of the tokens, added in part order."""

    sums: torch.Tensor
    counts: torch.Tensor


def assign_torch(
    x: torch.Tensor, centroids: torch.Tensor, scale: torch.Tensor | None = None, sums: bool = False,
    peaks: bool = False, redo: tuple | None = None,
) -> tuple:
    """Nearest centroid of every token.

    x: [N, S, D] (any float dtype, computed in fp32), times ``scale`` [N] (a power of two per row)
    when given; centroids: [N, C, D] fp32.
    Returns (assignments [N, S] int64, squared distance to the chosen centroid [N, S] fp32), and
    with ``sums`` the :class:`ClusterSums` of those assignments (one part) for
    :func:`update_torch`, from the same read of the tokens; with ``peaks``, last, each row's max
    |x| as read (before ``scale``; [N] fp32, NaN and Inf propagating), which a caller that does
    not know the rows' scale yet learns from the same read.
    ``redo``: an earlier result of this call on the same ``x`` (without its peaks), updated in
    place for the rows whose ``scale`` is not 1 and returned (the other rows' results are kept as
    they are): a pass run with every row's scale taken to be 1 is corrected for the rows where
    that guess was wrong, at the cost of reading those rows alone.
    Ties go to the lowest centroid index.
    """
    if redo is not None:
        if scale is not None:
            again = scale != 1
            for old, new in zip(redo, assign_torch(x[again], centroids[again], scale[again], sums)):
                for o, w in ((old, new),) if isinstance(old, torch.Tensor) else zip(old, new):
                    o[again] = w
        return redo
    n, c, d = centroids.shape
    c_sq = centroids.square().sum(-1).unsqueeze(1)  # [N, 1, C]
    idx, dist = [], []
    total = torch.zeros(n, c, d, device=x.device, dtype=torch.float32) if sums else None
    counts = torch.zeros(n, c, device=x.device, dtype=torch.float32) if sums else None
    for start in range(0, x.shape[1], CHUNK):
        xs = scaled_rows(x[:, start : start + CHUNK], scale)
        dd = c_sq - 2 * torch.bmm(xs, centroids.transpose(1, 2))  # [N, s, C], minus |x|^2
        best, arg = dd.min(-1)
        idx.append(arg)
        dist.append((best + xs.square().sum(-1)).clamp_min(0))
        if sums:
            _add_onehot(total, counts, arg, xs)
    out = (torch.cat(idx, 1), torch.cat(dist, 1))
    if sums:
        out += (ClusterSums(total.unsqueeze(1), counts.unsqueeze(1)),)
    if peaks:
        out += (torch.linalg.vector_norm(x.flatten(1), ord=float("inf"), dim=-1, dtype=torch.float32),)
    return out


def _add_onehot(total: torch.Tensor, counts: torch.Tensor, assignments: torch.Tensor, xs: torch.Tensor) -> None:
    """Add the tokens ``xs`` [N, s, D] fp32 to their clusters' sums ``total`` [N, C, D] and counts."""
    onehot = F.one_hot(assignments.long(), total.shape[1]).float()  # [N, s, C]
    total += torch.bmm(onehot.transpose(1, 2), xs)
    counts += onehot.sum(1)


def scaled_rows(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x in fp32, times ``scale`` [N] per row when given."""
    return x.float() if scale is None else x.float() * scale.view(-1, 1, 1)


def update_torch(
    x: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    scale: torch.Tensor | None = None,
    sums: ClusterSums | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster; empty clusters keep their centroid (:func:`reseed_torch` moves them).

    x: [N, S, D] (any float dtype, summed in fp32), times ``scale`` [N] when given; assignments:
    [N, S] int; centroids: [N, C, D] fp32 (previous). ``sums``: the :class:`ClusterSums` of
    ``assignments`` from the assignment pass (then the tokens are not read).
    Returns (new centroids [N, C, D] fp32, counts [N, C] fp32).
    """
    n, c, d = centroids.shape
    if sums is None:
        total = torch.zeros(n, c, d, device=x.device, dtype=torch.float32)
        counts = torch.zeros(n, c, device=x.device, dtype=torch.float32)
        for start in range(0, x.shape[1], CHUNK):
            chunk = slice(start, start + CHUNK)
            _add_onehot(total, counts, assignments[:, chunk], scaled_rows(x[:, chunk], scale))
    else:
        total, counts = sums.sums.sum(1), sums.counts.sum(1)
    means = total / counts.clamp_min(1).unsqueeze(-1)
    return torch.where(counts.unsqueeze(-1) > 0, means, centroids.float()), counts


def reseed_torch(
    means: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, far: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """The empty clusters (``counts`` [N, C] == 0) of ``means`` [N, C, D] fp32 moved onto tokens of
    ``x`` [N, S, D]: the j-th empty cluster of a row (in cluster order) takes token
    ``far[n, min(j, K - 1)]`` of ``far`` [N, K] (K >= 1; a row without an empty cluster reads
    none of its row, which may be -1), times ``scale`` [N] when given. In place; returns ``means``."""
    d = means.shape[-1]
    empty = counts == 0
    rank = (empty.long().cumsum(-1) - 1).clamp(0, far.shape[1] - 1)  # j-th empty -> j-th token
    tokens = torch.gather(far.long(), 1, rank).clamp_min(0)  # rows of no empty cluster: unread
    fallback = scaled_rows(torch.gather(x, 1, tokens.unsqueeze(-1).expand(-1, -1, d)), scale)
    return means.copy_(torch.where(empty.unsqueeze(-1), fallback, means))


def round_sizes(clusters: int, rounds: int) -> list[int]:
    """Picks per round of :func:`kmeanspp_torch`: 1, then ``clusters - 1`` split into ``rounds - 1``
    nearly equal rounds, the smaller first (1 <= rounds <= clusters; one round for one cluster)."""
    if rounds == 1:
        return [1]
    base, extra = divmod(clusters - 1, rounds - 1)
    return [1] + [base + (r >= rounds - 1 - extra) for r in range(rounds - 1)]


def kmeanspp_torch(points: torch.Tensor, weights: torch.Tensor, draws: torch.Tensor, clusters: int) -> torch.Tensor:
    """Weighted D^2 sampling (k-means++, a round of picks at a time) over the points of each row:
    ``points`` [N, K, D] (any float dtype, computed in fp32), ``weights`` [N, K] fp32 (>= 0),
    ``draws`` [R, K] fp32 > 0 (exponential variates, a row per round, shared by every row of
    points, so a row's picks depend only on its own points), ``clusters`` C picks (R <= C <= K).
    Returns [N, C] int64: distinct point indices, in the order picked.

    Round 0 picks one point, rounds 1 .. R-1 the rest (:func:`round_sizes`). A round ranks the
    points by key = score / draws[r] (Efraimidis-Spirakis: the first is drawn with probability
    proportional to its score), where a point's score is its weight, times (from round 1 on) its
    squared distance to the nearest point picked in an earlier round, and 0 once picked; it takes
    the points of the largest keys in turn (the lowest index among equal keys), and once no score
    left is positive (all points left coincide with picked ones or weigh nothing) the first point
    not yet picked. With R = C that is k-means++; fewer rounds take several points per pass over
    the points. Distances are ``sum((p - c)^2)`` in fp32, so a picked point (and a copy of it) is
    at distance 0 exactly."""
    points = points.float()
    n, k, _ = points.shape
    rows = torch.arange(n, device=points.device)
    # the points left once no score is positive rank by index: keys -1 - k / 2^m in (-2, -1], exact
    index = torch.arange(k, device=points.device, dtype=torch.float32) / (1 << (k - 1).bit_length())
    taken = torch.zeros(n, k, dtype=torch.bool, device=points.device)
    nearest = torch.ones(n, k, device=points.device)  # round 0 draws by weight alone
    picks = torch.empty(n, clusters, dtype=torch.int64, device=points.device)
    diff = torch.empty_like(points, dtype=torch.float32)  # one buffer for every pick's differences
    at = 0
    for r, size in enumerate(round_sizes(clusters, draws.shape[0])):
        score = torch.where(taken, 0.0, weights * nearest)
        # positive scores by score / draw, then the points left by index, never a picked one
        key = torch.where(score > 0, score / draws[r], torch.where(taken, -3.0, -1.0 - index))
        new = []
        for _ in range(size):
            best = key.argmax(-1)
            picks[:, at] = best
            at += 1
            taken[rows, best] = True
            key[rows, best] = -3.0
            new.append(best)
        if at == clusters:
            break
        for best in new:
            dist = torch.sub(points, points[rows, best].unsqueeze(1), out=diff).square_().sum(-1)
            nearest = dist if r == 0 else torch.minimum(nearest, dist)
    return picks


def far_segments(s: int, k: int, per_pick: int) -> tuple[int, int]:
    """(tokens a segment, whole segments) of :func:`far_tokens_torch` for a span of ``s`` tokens."""
    size = max(1, s // (per_pick * k))
    return size, s // size


def far_tokens_torch(dist: torch.Tensor, k: int, per_pick: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """[N, k] distinct token indices of ``dist`` [N, S] (squared distances, >= 0), farthest first:
    the farthest token of each of the k farthest of ``per_pick * k`` equal segments of the span
    (S // (per_pick * k) tokens each; a few tail tokens beyond the last whole segment are not
    considered), or exactly the k farthest tokens where a segment would hold one token. Equal
    distances go to the lowest token, within a segment and among segments. One pass over
    ``dist`` and a sort of the segments' peaks instead of a top-k over every token. ``counts``
    [N, C]: the clusters' sizes; a row with no empty cluster needs no far token and gets -1s."""
    n, s = dist.shape
    size, segments = far_segments(s, k, per_pick)
    heads, where = dist[:, : segments * size].view(n, segments, size).max(-1)  # the first of equal peaks
    top = torch.sort(heads, dim=-1, descending=True, stable=True).indices[:, :k]
    far = torch.gather(where, 1, top).add_(top, alpha=size)
    if counts is None:
        return far
    return far.masked_fill_(~(counts == 0).any(-1, keepdim=True), -1)


def gather_centroids(centroids: torch.Tensor, assignments: torch.Tensor) -> torch.Tensor:
    """centroids [N, C, D], assignments [N, S] -> each token's centroid, [N, S, D] fp32."""
    index = assignments.long().unsqueeze(-1).expand(-1, -1, centroids.shape[-1])
    return torch.gather(centroids.float(), 1, index)
