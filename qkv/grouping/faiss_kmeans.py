"""k-means through FAISS (``faiss.Kmeans``): faiss-cpu here, its GPU path when faiss-gpu is
installed and a GPU is visible. FAISS is imported only when this grouper runs. Every token is used
for training (no subsampling); fewer tokens than clusters gives every token its own cluster. Rows
are normalized by a power of two first (as the kmeans grouper does), so any finite input works."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from qkv.component import check_int
from qkv.errors import ConfigError
from qkv.grouping.base import GROUPING, ClusteringGrouper, Groups, row_factor


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the faiss grouper needs FAISS: pip install faiss-cpu (or faiss-gpu)"
        ) from exc
    return faiss


@GROUPING.register("faiss")
@dataclasses.dataclass(frozen=True)
class FaissGrouper(ClusteringGrouper):
    """Spec: ``faiss(clusters=256,iters=20,seed=0)``."""

    name: ClassVar[str] = "faiss"
    iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("faiss", "iters", self.iters, 1)
        check_int("faiss", "seed", self.seed, 0, 2**31 - 1)  # faiss's seed is a C int

    def group(self, x, init=None, *, backend="auto") -> Groups:
        faiss = _import_faiss()
        n, s, d = x.shape
        k = min(self.clusters, s) if init is None else init.shape[1]
        factor = row_factor(x).view(-1, 1, 1)  # FAISS works in fp32 on unscaled squares: as kmeans does
        x = x.float() * factor
        init = None if init is None else init * factor
        data = x.detach().float().cpu().numpy()
        use_gpu = bool(getattr(faiss, "get_num_gpus", lambda: 0)())
        centroids, assignments = [], []
        for row in range(n):
            km = faiss.Kmeans(
                d,
                k,
                niter=self.iters,
                seed=self.seed,
                gpu=use_gpu,
                max_points_per_centroid=max(s, 1),
                min_points_per_centroid=1,
            )
            start = None if init is None else init[row].detach().float().cpu().numpy()
            km.train(data[row], init_centroids=start)
            _, label = km.index.search(data[row], 1)
            centroids.append(torch.from_numpy(km.centroids.copy()))
            assignments.append(torch.from_numpy(label[:, 0].astype("int64")))
        centroids = torch.stack(centroids).to(x.device) / factor
        return Groups(centroids, torch.stack(assignments).to(x.device))
