import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.errors import ConfigError, UnknownComponentError
from qkv.grouping import GROUPING, KMeansGrouper, kmeans
from qkv.grouping.kmeans import INITS
from qkv.kernels.kmeans import assign_torch


def clustered(n=2, s=300, d=8, true_k=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, true_k, d, generator=gen) * 5
    labels = torch.randint(0, true_k, (n, s), generator=gen)
    return torch.gather(centres, 1, labels.unsqueeze(-1).expand(-1, -1, d)) + 0.3 * torch.randn(n, s, d, generator=gen)


@given(
    s=st.integers(1, 200),
    c=st.integers(1, 40),
    init=st.sampled_from(INITS),
    seed=st.integers(0, 1000),
)
def test_objective_never_increases_and_final_assignment_is_nearest(s, c, init, seed):
    x = clustered(s=s, seed=seed)
    res = kmeans(x, c, iters=8, tol=0.0, init=init, seed=seed)
    obj = res.objective
    assert bool((obj[1:] <= obj[:-1] * (1 + 1e-5) + 1e-6).all())
    dist = (x.unsqueeze(2) - res.centroids.unsqueeze(1)).square().sum(-1)  # [N, S, C]
    chosen = torch.gather(dist, 2, res.assignments.unsqueeze(-1)).squeeze(-1)
    assert bool((chosen <= dist.min(-1).values * (1 + 1e-5) + 1e-5).all())
    assert res.centroids.shape[1] == min(c, s)


def test_deterministic_and_seed_dependent():
    x = clustered(s=500)
    a, b = kmeans(x, 16, 10, seed=3), kmeans(x, 16, 10, seed=3)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    assert not torch.equal(a.centroids, kmeans(x, 16, 10, seed=4).centroids)


def test_rows_are_independent_of_the_batch():
    x = clustered(n=3, s=400)
    both = kmeans(x, 8, 20, tol=1e-3)
    alone = kmeans(x[1:2], 8, 20, tol=1e-3, seed=0)
    # the init draws differ per batch, so compare a warm-started run: same init -> same result
    warm_all = kmeans(x, 8, 20, tol=1e-3, init_centroids=both.centroids)
    warm_one = kmeans(x[1:2], 8, 20, tol=1e-3, init_centroids=both.centroids[1:2])
    assert torch.equal(warm_all.centroids[1:2], warm_one.centroids)
    assert alone.centroids.shape == (1, 8, 8)


@pytest.mark.parametrize("iters", [5, 9, 20])
def test_stopping_early_only_saves_time(monkeypatch, iters):
    """The host's "all rows done" check (every CHECK_EVERY iterations while enough remain) ends
    the loop early, but done rows are frozen: the result equals that of a run without checks."""
    km = importlib.import_module("qkv.grouping.kmeans")  # the module (the package exports the function)
    x = clustered(n=3, s=600, true_k=6)
    runs = []
    for every in (1, 1000):
        monkeypatch.setattr(km, "CHECK_EVERY", every)
        runs.append(kmeans(x, 6, iters, tol=1e-2, seed=1))
    checked, unchecked = runs
    assert torch.equal(checked.centroids, unchecked.centroids)
    assert torch.equal(checked.assignments, unchecked.assignments)
    assert torch.equal(checked.objective[-1], unchecked.objective[-1])
    assert len(checked.objective) < len(unchecked.objective) == iters + 1  # it did stop early


def test_the_early_stop_never_waits_for_its_answer(monkeypatch):
    """On a GPU the "all rows done" answer reaches the host later (``qkv.readback.Arriving``):
    k-means reads it only once it has arrived (no host sync), asks no new question meanwhile, and
    stops at the first check after it, one check later than with the answer at hand, with the
    same result as a run without checks."""
    km = importlib.import_module("qkv.grouping.kmeans")

    class Late:  # an answer that has arrived from the second look on
        def __init__(self, t):
            self.t, self.looks = t.clone(), 0

        def ready(self):
            self.looks += 1
            return self.looks > 1

        def values(self):
            assert self.looks > 1, "waited for an answer that had not arrived"
            return self.t.tolist()

    x = clustered(n=3, s=600, true_k=6)
    monkeypatch.setattr(km, "CHECK_EVERY", 1)
    at_hand = kmeans(x, 6, 20, tol=1e-2, seed=1)
    monkeypatch.setattr(km, "Arriving", Late)
    late = kmeans(x, 6, 20, tol=1e-2, seed=1)
    monkeypatch.setattr(km, "CHECK_EVERY", 1000)
    unchecked = kmeans(x, 6, 20, tol=1e-2, seed=1)
    assert torch.equal(late.centroids, unchecked.centroids) and torch.equal(late.assignments, unchecked.assignments)
    assert len(at_hand.objective) < len(late.objective) < len(unchecked.objective)


def test_no_early_stop_question_while_a_graph_is_captured(monkeypatch):
    """While a CUDA graph is captured (simulated: tensors that say they are on a GPU, a stream that
    says it is capturing) k-means asks nothing about its rows (a replay could not act on the
    answer) and runs every iteration, with the result of a run that stopped early."""
    km = importlib.import_module("qkv.grouping.kmeans")
    x = clustered(n=3, s=600, true_k=6)
    monkeypatch.setattr(km, "CHECK_EVERY", 1)
    checked = kmeans(x, 6, 20, tol=1e-2, seed=1, backend="torch")  # stops early

    def asked(t):
        raise AssertionError("asked whether all rows are done during a capture")

    monkeypatch.setattr(km, "Arriving", asked)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    captured = kmeans(x, 6, 20, tol=1e-2, seed=1, backend="torch")
    monkeypatch.undo()
    assert torch.equal(captured.centroids, checked.centroids)
    assert len(checked.objective) < len(captured.objective) == 21


def test_warm_start_needs_fewer_iterations():
    x = clustered(s=2000, true_k=12)
    cold = kmeans(x, 12, 30, tol=0.0)
    warm = kmeans(x + 0.01, 12, 0, init_centroids=cold.centroids)  # 0 iterations: assign only
    assert warm.objective[-1].sum() <= cold.objective[0].sum()


def test_warm_iters_apply_to_warm_started_groupings_only(monkeypatch):
    """``warm_iters`` sets the Lloyd iterations of a grouping seeded with centroids; a cold one
    runs ``iters``; the spec keeps it and refuses a negative count."""
    runs = []
    module = importlib.import_module("qkv.grouping.kmeans")
    real = module.kmeans
    monkeypatch.setattr(module, "kmeans", lambda x, c, iters, **kw: runs.append(iters) or real(x, c, iters, **kw))
    g = GROUPING.build("kmeans(clusters=8,warm_iters=2)")
    assert g == KMeansGrouper(clusters=8, warm_iters=2) and g.token == "kmeans(clusters=8,warm_iters=2)"
    x = clustered(s=64)
    cold = g.group(x)
    g.group(x, cold.centroids)
    KMeansGrouper(clusters=8).group(x, cold.centroids)
    assert runs == [5, 2, 5]
    assert qkv.build_policy("qvg", warm_iters=3).k.grouping.warm_iters == 3
    with pytest.raises(ConfigError, match="warm_iters"):
        KMeansGrouper(warm_iters=-1)


@given(s=st.integers(1, 200), c=st.integers(1, 40), iters=st.integers(1, 6), seed=st.integers(0, 1000),
       warm=st.booleans())
def test_finish_update_is_the_last_iteration_without_the_final_pass(s, c, iters, seed, warm):
    """finish="update" returns the centroids finish="assign" returns (the last update's), with the
    assignments of the last Lloyd pass, which a run of one iteration fewer ends with; each
    non-empty cluster's centroid is the mean of its tokens; one assignment pass fewer."""
    x = clustered(s=s, seed=seed)
    init = kmeans(x, c, 1, seed=seed).centroids if warm else None
    args = dict(tol=0.0, init="random", seed=seed, init_centroids=init)
    update = kmeans(x, c, iters, finish="update", **args)
    assign = kmeans(x, c, iters, **args)
    one_fewer = kmeans(x, c, iters - 1, **args)
    assert torch.equal(update.centroids, assign.centroids)
    assert torch.equal(update.assignments, one_fewer.assignments)
    assert torch.equal(update.objective, assign.objective[:-1]) and len(update.objective) == iters
    onehot = torch.nn.functional.one_hot(update.assignments, update.centroids.shape[1]).double()  # [N, S, C]
    counts = onehot.sum(1)
    means = torch.einsum("nsc,nsd->ncd", onehot, x.double()) / counts.clamp(min=1).unsqueeze(-1)
    filled = counts > 0
    assert torch.allclose(update.centroids.double()[filled], means[filled], rtol=1e-5, atol=1e-5)
    # the final means only lower the last pass's objective (which the pass sums as |x|^2 - 2 x.c + |c|^2
    # in fp32: to within its rounding)
    final = x - torch.gather(update.centroids, 1, update.assignments.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    slack = 1e-5 * x.double().square().sum((1, 2))
    assert bool((final.double().square().sum((1, 2)) <= update.objective[-1] + slack).all())


def test_finish_update_with_no_iteration_is_the_initial_assignment():
    x = clustered(s=80)
    a, b = kmeans(x, 6, 0, seed=1), kmeans(x, 6, 0, seed=1, finish="update")
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.assignments, b.assignments)
    assert torch.equal(a.objective, b.objective) and len(b.objective) == 1


def test_finish_spec_override_and_errors():
    g = GROUPING.build("kmeans(clusters=8,finish=update)")
    assert g == KMeansGrouper(clusters=8, finish="update") and g.token == "kmeans(clusters=8,finish=update)"
    assert KMeansGrouper().token == "kmeans" and KMeansGrouper().finish == "assign"
    policy = qkv.build_policy("qvg", finish="update")
    assert policy.k.grouping.finish == policy.v.grouping.finish == "update"
    with pytest.raises(ConfigError, match="finish='last' is not supported; valid values: assign, update"):
        KMeansGrouper(finish="last")
    with pytest.raises(ConfigError, match="finish"):
        kmeans(clustered(), 4, 2, finish="Update")
    with pytest.raises(ConfigError, match="finish"):
        qkv.build_policy("rtn", finish="update")


def test_empty_clusters_and_degenerate_input():
    zeros = torch.zeros(1, 50, 4)
    res = kmeans(zeros, 8, 5)
    assert torch.equal(res.centroids, torch.zeros(1, 8, 4))
    dup = torch.tensor([[[1.0, 0], [1.0, 0], [2.0, 0]]])
    res = kmeans(dup, 3, 5)
    assert res.objective[-1].item() == 0.0
    few = kmeans(torch.randn(2, 3, 4), 256, 5)
    assert few.centroids.shape == (2, 3, 4) and few.objective[-1].abs().max() < 1e-6


def test_huge_magnitudes_do_not_overflow():
    x = clustered(s=100) * 1e35
    res = kmeans(x, 4, 5)
    assert bool(torch.isfinite(res.centroids).all()) and bool(torch.isfinite(res.objective).all())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("clusters", [16, 64])  # the assignment that also sums / the on-chip one (Triton)
@pytest.mark.parametrize("finish, iters", [("assign", 2), ("update", 1), ("assign", 0)])
def test_peaks_measured_by_the_first_pass_give_what_given_peaks_give(backend, clusters, finish, iters):
    """Without the rows' max |x|, k-means from random tokens or a warm start takes every row's
    factor to be 1 in its first assignment pass, measures the peaks there and runs that pass again
    for the rows outside the safe range: the result is the one given peaks give, bit for bit, rows
    of huge and tiny magnitudes included (k-means|| needs the factors first and reads the peaks)."""
    x = clustered(n=3, s=128, d=32)
    x[1] *= 2.0**90
    x[2] *= 2.0**-100
    x = x.bfloat16().to("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    peaks = torch.linalg.vector_norm(x.flatten(1), ord=float("inf"), dim=-1, dtype=torch.float32)
    starts = [{"init": "random"}, {"init_centroids": x[:, :clusters].float()}] + [{"init": "kmeans||"}] * (clusters < 64)
    for start in starts:
        args = dict(iters=iters, finish=finish, backend=backend, **start)
        measured, given = kmeans(x, clusters, **args), kmeans(x, clusters, peaks=peaks, **args)
        assert torch.equal(measured.centroids, given.centroids) and torch.isfinite(given.centroids).all()
        assert torch.equal(measured.assignments, given.assignments)
        assert torch.equal(measured.objective, given.objective)


def test_grouper_spec_and_errors():
    g = GROUPING.build("kmeans(clusters=8,iters=3,seed=2)")
    assert g == KMeansGrouper(clusters=8, iters=3, seed=2) and g.token == "kmeans(clusters=8,iters=3,seed=2)"
    groups = g.group(clustered(s=64))
    assert groups.centroids.shape == (2, 8, 8) and groups.assignments.shape == (2, 64)
    with pytest.raises(ConfigError, match="kmeans\\+\\+, kmeans\\|\\|, random"):
        KMeansGrouper(init="forgy")
    with pytest.raises(UnknownComponentError, match="blocks, faiss, kmeans, none"):
        GROUPING.build("kmedoids")


def test_chunked_assignment_matches_direct():
    from qkv.kernels import kmeans as km

    x, c = torch.randn(2, 9000, 16), torch.randn(2, 40, 16)
    idx, dist = assign_torch(x, c)
    direct = torch.cdist(x, c).square()
    assert km.CHUNK < 9000
    chosen = torch.gather(direct, 2, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(chosen, direct.min(-1).values, rtol=1e-4, atol=1e-4)
    assert torch.allclose(dist, chosen, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("s, k", [(10, 4), (1000, 8), (1003, 5)])
def test_far_tokens_are_distinct_and_start_with_the_farthest(s, k):
    from qkv.kernels.kmeans import far_tokens_torch

    dist = torch.rand(3, s, generator=torch.Generator().manual_seed(s))
    far = far_tokens_torch(dist, k, 4)
    assert far.shape == (3, k)
    size = s // (4 * k)
    searched = s - s % size if size > 1 else s  # a tail shorter than one segment is not searched
    assert torch.equal(far[:, 0], dist[:, :searched].argmax(-1))
    assert all(len(set(row.tolist())) == k for row in far)
    picked = torch.gather(dist, 1, far)
    assert bool((picked[:, :-1] >= picked[:, 1:]).all())  # farthest first


@pytest.mark.parametrize("finish", ["assign", "update"])
def test_objective_left_out_changes_nothing_else(finish):
    """``objective=False`` (what a grouping asks): the same centroids and assignments, no objective."""
    x = torch.randn(3, 500, 16, generator=torch.Generator().manual_seed(5))
    full = kmeans(x, 12, 3, finish=finish)
    bare = kmeans(x, 12, 3, finish=finish, objective=False)
    assert bare.objective is None and full.objective.shape == (3 + (finish == "assign"), 3)
    assert torch.equal(bare.centroids, full.centroids) and torch.equal(bare.assignments, full.assignments)


def test_defaults_are_the_qvg_presets():
    # a spec that names only the clusters costs what a preset costs (5 iterations, random seeding)
    preset = qkv.build_policy("qvg").k.grouping
    assert KMeansGrouper() == preset
    assert qkv.build_policy("kmeans(clusters=128),centroid,int2").k.grouping == preset.replace(clusters=128)
