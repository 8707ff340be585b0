"""KVCache(encode_graphs=True): span encodes that draw nothing (warm-started, or without k-means)
captured once per shape and replayed (qkv.caches.encode_graphs). On the CPU the graph is emulated (a replay runs the captured encode
again into the captured output's tensors, as a CUDA graph's replay writes its own memory), which
checks the plumbing: inputs and warm starts copied in, outputs copied out, one capture per shape.
On a GPU the encode is captured in a real CUDA graph."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.caches.encode_graphs import EncodeGraphs
from qkv.errors import BackendError, ConfigError

H, D, SPAN = 2, 32, 64


class Emulated:
    """A graph whose replay recomputes into the captured output's own tensors."""

    def __init__(self, encode, out):
        self.encode, self.out = encode, out

    def replay(self):
        fresh = self.encode().tensors()
        for name, t in self.out.tensors().items():
            t.copy_(fresh[name])


def emulated_capture(encode, pool):
    """As cuda_graph: the graph and the captured output, which every replay rewrites."""
    out = encode()
    return Emulated(encode, out), out


def stream(cache, chunks, gen, device="cpu"):
    for _ in range(chunks):
        k, v = (torch.randn(1, H, SPAN, D, generator=gen, device=device) for _ in range(2))
        cache.append(0, k, v)


def spans(cache):
    return [sp.ckv for sp in cache.layer(0).spans]


def assert_same(a, b):
    for x, y in ((a.k, b.k), (a.v, b.v)):
        tx, ty = x.tensors(), y.tensors()
        assert tx.keys() == ty.keys() and all(torch.equal(tx[n], ty[n]) for n in tx)


def built(policy: str) -> qkv.Policy:
    """A preset with 8 clusters, or ``mixed``: K and V under different policies (encoded apart)."""
    if policy == "mixed":
        return qkv.Policy(qkv.build_policy("qvg", clusters=8).k, qkv.build_policy("qvg", clusters=4).v)
    return qkv.build_policy(policy, clusters=8)


@pytest.mark.parametrize("policy", ["qvg", "qvg-pro", "mixed"])
def test_graphed_spans_equal_eager_spans_and_outlive_the_next_replay(policy):
    """Five spans of one shape: the first (cold: random seeding) is encoded eagerly, the second
    captures the warm-started encode, the rest replay it; every span equals the eager cache's bit
    for bit (off a GPU k-means stops early in both), and a span is not changed by the replays
    after it (its fields were copied out: by the split of K and V encoded in one pass, else by
    the graphs)."""
    built = globals()["built"](policy)
    eager = qkv.KVCache(built, num_layers=1, span_tokens=SPAN)
    graphed = qkv.KVCache(built, num_layers=1, span_tokens=SPAN, encode_graphs=True)
    graphs = graphed.config.__dict__["graphs"] = EncodeGraphs(emulated_capture, devices=("cpu",))
    stream(eager, 5, torch.Generator().manual_seed(0))
    stream(graphed, 2, torch.Generator().manual_seed(0))
    second = {n: t.clone() for n, t in spans(graphed)[1].k.tensors().items()}
    stream(graphed, 3, torch.Generator().manual_seed(1))
    assert len(graphs) == (1 if policy != "mixed" else 2)
    assert all(torch.equal(t, spans(graphed)[1].k.tensors()[n]) for n, t in second.items())
    same = qkv.KVCache(built, num_layers=1, span_tokens=SPAN, encode_graphs=True)
    same.config.__dict__["graphs"] = EncodeGraphs(emulated_capture, devices=("cpu",))
    stream(same, 5, torch.Generator().manual_seed(0))
    for a, b in zip(spans(eager), spans(same), strict=True):
        assert_same(a, b)


def token_by_token(cache, steps, gen, device="cpu"):
    for _ in range(steps):
        k, v = (torch.randn(1, H, 1, D, generator=gen, device=device) for _ in range(2))
        cache.append(0, k, v)


@pytest.mark.parametrize("policy, graphs_made", [("rtn", 1), ("quarot", 1), ("kivi", 2)])
def test_policies_without_kmeans_replay_from_their_first_encode(policy, graphs_made):
    """A policy whose compression draws nothing (no k-means seeding) is captured at its first
    encode, cold: token-by-token decoding's groups (KIVI: K and V under different policies, two
    shapes) all replay, and every span equals the eager cache's bit for bit."""
    options = {} if policy == "kivi" else {"span_tokens": SPAN}
    eager = qkv.KVCache(policy, num_layers=1, **options)
    graphed = qkv.KVCache(policy, num_layers=1, encode_graphs=True, **options)
    graphs = graphed.config.__dict__["graphs"] = EncodeGraphs(emulated_capture, devices=("cpu",))
    token_by_token(eager, 200, torch.Generator().manual_seed(5))
    token_by_token(graphed, 200, torch.Generator().manual_seed(5))
    assert len(spans(graphed)) >= 2 and len(graphs) == graphs_made
    for a, b in zip(spans(eager), spans(graphed), strict=True):
        assert_same(a, b)


def test_compress_many_replays_one_graph_per_stacked_shape():
    """The one-pass compression of several layers' chunks (KVCache.compress_ahead) goes through
    the graphs too: warm-started, the same results as without them."""
    policy = qkv.build_policy("qvg", clusters=8)
    gen = torch.Generator().manual_seed(1)
    first = [tuple(torch.randn(1, H, SPAN, D, generator=gen) for _ in range(2)) for _ in range(3)]
    warm = policy.compress_many(first)
    graphs = EncodeGraphs(emulated_capture, devices=("cpu",))
    for _ in range(3):
        pairs = [tuple(torch.randn(1, H, SPAN, D, generator=gen) for _ in range(2)) for _ in range(3)]
        for a, b in zip(policy.compress_many(pairs, warm_starts=warm), policy.compress_many(pairs, warm_starts=warm,
                                                                                             graphs=graphs)):
            assert_same(a, b)
    assert len(graphs) == 1
    cold = policy.compress_many(first, graphs=graphs)  # no warm start: eager
    assert len(graphs) == 1 and len(cold) == 3


def test_an_encode_that_cannot_be_captured_raises():
    def failing(encode, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    policy = qkv.build_policy("qvg", clusters=8)
    gen = torch.Generator().manual_seed(2)
    k, v = (torch.randn(1, H, SPAN, D, generator=gen) for _ in range(2))
    warm = policy.compress(k, v)
    with pytest.raises(BackendError, match="could not be captured"):
        policy.compress(k, v, warm_start=warm, graphs=EncodeGraphs(failing, devices=("cpu",)))
    with pytest.raises(ConfigError, match="encode_graphs"):
        qkv.KVCache("qvg", encode_graphs="yes")


def test_without_a_gpu_the_default_graphs_encode_eagerly():
    """The default :class:`EncodeGraphs` captures CUDA encodes only: a CPU cache made with
    ``encode_graphs=True`` compresses as one made without."""
    caches = [qkv.KVCache(qkv.build_policy("qvg", clusters=8), num_layers=1, span_tokens=SPAN, encode_graphs=g)
              for g in (False, True)]
    for cache in caches:
        stream(cache, 3, torch.Generator().manual_seed(3))
    for a, b in zip(spans(caches[0]), spans(caches[1]), strict=True):
        assert_same(a, b)
    assert len(caches[1].config.graphs) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_warm_started_encode_is_captured_in_a_cuda_graph():
    """On a GPU: spans after the second replay one captured graph; each decompresses as close to
    its input as the eager cache's span does (k-means runs its 5 iterations in both: no early
    stop below 8)."""
    policy = qkv.build_policy("qvg", clusters=16)
    eager = qkv.KVCache(policy, num_layers=1, span_tokens=1024)
    graphed = qkv.KVCache(policy, num_layers=1, span_tokens=1024, encode_graphs=True)
    inputs = []
    gen = torch.Generator(device="cuda").manual_seed(4)
    for _ in range(5):
        k, v = (torch.randn(1, 4, 1024, 128, generator=gen, device="cuda").bfloat16() for _ in range(2))
        inputs.append((k, v))
        eager.append(0, k, v)
        graphed.append(0, k, v)
    assert len(graphed.config.graphs) == 1
    for (k, v), a, b in zip(inputs, spans(eager), spans(graphed), strict=True):
        for x, ea, gr in zip((k, v), policy.decompress(a), policy.decompress(b)):
            err_e, err_g = ((y.float() - x.float()).norm() / x.float().norm() for y in (ea, gr))
            assert err_g <= err_e * 1.02 + 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_kivi_groups_are_captured_in_cuda_graphs():
    """On a GPU: KIVI's groups, compressed every 32 tokens of token-by-token decoding, replay
    one captured graph each for K and V from the first group on, bit for bit the eager cache's."""
    eager = qkv.KVCache("kivi", num_layers=1)
    graphed = qkv.KVCache("kivi", num_layers=1, encode_graphs=True)
    gen = torch.Generator(device="cuda").manual_seed(6)
    for _ in range(300):
        k, v = (torch.randn(1, 4, 1, 128, generator=gen, device="cuda").bfloat16() for _ in range(2))
        eager.append(0, k, v)
        graphed.append(0, k, v)
    assert len(spans(graphed)) >= 2 and len(graphed.config.graphs) == 2
    for a, b in zip(spans(eager), spans(graphed), strict=True):
        assert_same(a, b)
