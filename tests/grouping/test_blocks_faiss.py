import pytest
import torch

from qkv.errors import ShapeError
from qkv.grouping import BlockGrouper, FaissGrouper, kmeans


def test_blocks_are_grid_means():
    g = BlockGrouper(t=2, h=2, w=3, height=4, width=6)
    x = torch.randn(3, 4 * 4 * 6, 5)  # 4 frames of 4x6 tokens
    groups = g.group(x)
    assert groups.centroids.shape == (3, g.predicted_groups(x.shape[1]), 5) == (3, 2 * 2 * 2, 5)
    grid = x.view(3, 2, 2, 2, 2, 2, 3, 5)  # n, ft, t, hb, h, wb, w, d
    expected = grid.mean(dim=(2, 4, 6)).reshape(3, 8, 5)
    assert torch.allclose(groups.centroids, expected, atol=1e-6)
    assert g.stores_assignments is False


def test_blocks_ragged_edges_and_errors():
    g = BlockGrouper(t=1, h=3, w=3, height=4, width=5)
    groups = g.group(torch.randn(1, 40, 2))
    assert groups.centroids.shape[1] == 2 * 2 * 2
    assert torch.bincount(groups.assignments[0]).sum() == 40
    with pytest.raises(ShapeError, match="frames"):
        g.group(torch.randn(1, 41, 2))


def test_faiss_grouper_matches_kmeans_quality():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1000, 8, generator=gen)
    ours = kmeans(x, 16, 20)
    groups = FaissGrouper(clusters=16, iters=20).group(x)
    assert groups.centroids.shape == (2, 16, 8)
    faiss_obj = (x - torch.gather(groups.centroids, 1, groups.assignments.unsqueeze(-1).expand(-1, -1, 8))).square().sum()
    assert faiss_obj <= ours.objective[-1].sum() * 1.1
    again = FaissGrouper(clusters=16, iters=20).group(x)
    assert torch.equal(groups.assignments, again.assignments)
    few = FaissGrouper(clusters=16).group(torch.randn(1, 5, 8))
    assert few.centroids.shape == (1, 5, 8)
