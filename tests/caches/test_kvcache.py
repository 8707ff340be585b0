"""qkv.KVCache: streaming appends, spans compressed once, sink/tail/eviction, exact memory, bad chunks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.caches.cache_config import CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.checks import CHECK_BATCH
from qkv.caches.tail import extent
from qkv.caches.layer_state import centroids_only
from qkv.errors import CacheError, ConfigError, CorruptDataError, DTypeError, GradientError, NonFiniteError, ShapeError

pytestmark = pytest.mark.usefixtures("one_thread")

QVG = qkv.build_policy("qvg", clusters=4)  # small spans: few clusters


def stream(seed: int, sizes: list[int], b: int = 1, h: int = 2, d: int = 64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, h, n, d, generator=gen).to(dtype), torch.randn(b, h, n, d, generator=gen).to(dtype))
        for n in sizes
    ]


def full(chunks):
    return torch.cat([k for k, _ in chunks], 2), torch.cat([v for _, v in chunks], 2)


@given(data=st.data())
def test_lossless_policy_reads_back_the_retained_stream(data):
    """bf16 policy on bf16 chunks: read() is exactly sink + retained history, in order, any config."""
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=14))
    span = data.draw(st.sampled_from([{"span_chunks": 1}, {"span_chunks": 3}, {"span_tokens": 4}, {"span_tokens": 7}]))
    sink = data.draw(st.integers(0, 2))
    in_tokens = data.draw(st.booleans())  # a sink of ``sink * 3`` tokens, cutting chunks where it ends
    max_spans = data.draw(st.sampled_from([None, 1, 2]))
    chunks = stream(data.draw(st.integers(0, 99)), sizes, d=16, dtype=torch.bfloat16)
    sink_option = {"sink_tokens": 3 * sink} if in_tokens else {"sink_chunks": sink}
    cache = KVCache("bf16", max_spans=max_spans, **sink_option, **span)
    for i, (k, v) in enumerate(chunks):
        cache.append(0, k, v)
        layer = cache.layer(0)
        k_all, v_all = full(chunks[: i + 1])
        pos = layer.positions()
        got_k, got_v = cache.read(0)
        assert torch.equal(got_k, k_all[:, :, pos]) and torch.equal(got_v, v_all[:, :, pos])
        n_sink = min(3 * sink, sum(sizes[: i + 1])) if in_tokens else sum(sizes[: min(sink, i + 1)])
        assert pos[:n_sink].tolist() == list(range(n_sink))  # the sink is never evicted
        assert torch.equal(pos[n_sink:], torch.arange(layer.seen - len(pos) + n_sink, layer.seen))  # newest, contiguous
        assert layer.seen == sum(sizes[: i + 1]) and layer.tokens == len(pos)
        assert max_spans is None or len(layer.spans) <= max_spans
        assert cache.memory().bits_per_element == 16.0


ORIGINAL_COMPRESS = qkv.Policy.compress


@pytest.fixture
def compress_calls(monkeypatch):
    """The shape of K in every ``Policy.compress`` call."""
    calls = []

    def counting(self, k, v, **kw):
        calls.append(tuple(k.shape))
        return ORIGINAL_COMPRESS(self, k, v, **kw)

    monkeypatch.setattr(qkv.Policy, "compress", counting)
    return calls


def test_spans_compressed_once_and_equal_to_the_policy_on_that_span(compress_calls):
    calls = compress_calls
    original = ORIGINAL_COMPRESS
    chunks = stream(1, [8] * 9, h=3)
    cache = KVCache(QVG, span_chunks=2, sink_chunks=1, warm_start=False)
    seen_spans = []
    for k, v in chunks:
        cache.append(0, k, v)
        layer = cache.layer(0)
        assert [id(s) for s in layer.spans[: len(seen_spans)]] == seen_spans  # never replaced
        seen_spans = [id(s) for s in layer.spans]
    assert [s[2] for s in calls] == [16, 16, 16, 16]  # 8 non-sink chunks -> 4 spans, one compress call each
    k_all, v_all = full(chunks)
    layer = cache.layer(0)
    got_k, got_v = cache.read(0)
    for i, span in enumerate(layer.spans):
        ref = original(QVG, k_all[:, :, 8 + 16 * i : 24 + 16 * i], v_all[:, :, 8 + 16 * i : 24 + 16 * i])
        rk, rv = QVG.decompress(ref)
        assert torch.equal(got_k[:, :, 8 + 16 * i : 24 + 16 * i], rk)
        assert torch.equal(got_v[:, :, 8 + 16 * i : 24 + 16 * i], rv)
        for name, t in ref.k.tensors().items():
            assert torch.equal(span.ckv.k.tensors()[name], t), name
    assert torch.equal(got_k[:, :, :8], chunks[0][0])  # sink exact


@pytest.mark.parametrize("init", ["random", "kmeans++", "kmeans||"])
def test_cold_start_heads_together_equal_each_head_alone(init, compress_calls):
    """A span's heads are clustered in one call, and a head's span is what compressing that head
    alone gives (k-means's draws are shared by all rows), bit for bit; one call per span."""
    policy = qkv.build_policy(f"kmeans(clusters=8,iters=3,init={init}),centroid,int2(block=16)")
    original = ORIGINAL_COMPRESS
    chunks = stream(2, [160, 160], h=4)
    cache = KVCache(policy, span_chunks=2, warm_start=False)
    for k, v in chunks:
        cache.append(0, k, v)
    assert [s[1] for s in compress_calls] == [4]
    k_all, v_all = full(chunks)
    span = cache.layer(0).spans[0].ckv
    for h in range(4):
        ref = original(policy, k_all[:, h : h + 1], v_all[:, h : h + 1])
        for got, want in ((span.k, ref.k), (span.v, ref.v)):
            for name, t in want.tensors().items():
                assert torch.equal(got.tensors()[name][:, h : h + 1], t), (h, name)


def spans_equal(a: KVCache, b: KVCache, layers: int) -> bool:
    return all(
        torch.equal(t, y.tensors()[name])
        for i in range(layers)
        for sa, sb in zip(a.layer(i).spans, b.layer(i).spans, strict=True)
        for x, y in ((sa.ckv.k, sb.ckv.k), (sa.ckv.v, sb.ckv.v))
        for name, t in x.tensors().items()
    )


def test_compress_ahead_makes_every_layers_span_in_one_pass(compress_passes, compress_calls):
    """Every layer's chunk compressed ahead in one pass (warm starts included), then appended: the
    spans are those of plain appends, bit for bit, and the appends compress nothing more."""
    passes = compress_passes
    options = dict(num_layers=3, span_chunks=1, sink_chunks=1)
    cache, ref = KVCache(QVG, **options), KVCache(QVG, **options)
    for step, chunk in enumerate(stream(3, [24] * 4, h=2)):
        chunks = {i: (chunk[0] + i, chunk[1] - i) for i in range(3)}
        cache.compress_ahead(chunks)
        held = cache.memory().compressed
        if step:  # the first chunk goes to the sink: nothing to compress ahead
            assert all(cache.layer(i)._ahead is not None for i in range(3)) and held > ref.memory().compressed
        for i, (k, v) in chunks.items():
            cache.append(i, k, v)
            ref.append(i, k, v)
        assert cache.memory().compressed == ref.memory().compressed
    # per chunk after the sink: one pass of 3 pairs ahead, then the reference's 3 plain compressions
    assert passes == [3, 1, 1, 1] * 3 and len(compress_calls) == 9
    assert spans_equal(cache, ref, 3)


def test_compress_ahead_of_a_chunk_that_changes_or_never_comes_is_dropped():
    options = dict(num_layers=2, span_chunks=1)
    cache, ref = KVCache(QVG, **options), KVCache(QVG, **options)
    (k, v), (k2, v2) = stream(4, [24, 24])
    cache.compress_ahead({0: (k, v), 1: (k, v)})
    k.mul_(2)  # changed in place after it was compressed ahead: compressed again
    cache.append(0, k, v)
    ref.append(0, k, v)
    cache.append(1, k2, v2)  # another chunk came: the one compressed ahead is dropped
    ref.append(1, k2, v2)
    assert spans_equal(cache, ref, 2) and cache.memory() == ref.memory()
    spans = KVCache(QVG, num_layers=1, span_chunks=2)
    spans.compress_ahead({0: (k, v)})  # two chunks a span: nothing to compress ahead
    assert spans.layer(0)._ahead is None


def test_compress_ahead_checks_every_chunk_with_one_read_back(monkeypatch):
    """The value check of every chunk compressed ahead is one read-back; their appends read back
    nothing. A bad chunk compresses nothing ahead, and its own append names it."""
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append("tolist")
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    cache = KVCache(QVG, num_layers=3, span_chunks=1, warm_start=False)
    chunks = {i: c for i, c in enumerate(stream(5, [24] * 3))}
    cache.compress_ahead(chunks)
    assert len(calls) == 1
    for i, (k, v) in chunks.items():
        cache.append(i, k, v)
    assert len(calls) == 1
    bad = {i: (k + 1, v) for i, (k, v) in chunks.items()}
    bad[1][0][0, 0, 3, 5] = float("nan")
    cache.compress_ahead(bad)
    assert all(cache.layer(i)._ahead is None for i in range(3))
    cache.append(0, *bad[0])
    with pytest.raises(NonFiniteError, match="layer 1: k holds 1 NaN"):
        cache.append(1, *bad[1])


def test_a_replace_stores_the_span_compressed_ahead(monkeypatch):
    """``replace`` of a chunk compressed ahead (warm-started from the span it replaces) stores
    that span, the same bit for bit as a plain replace, without compressing or checking it again."""
    cache, ref = KVCache(QVG, num_layers=2, span_chunks=1), KVCache(QVG, num_layers=2, span_chunks=1)
    old, new = stream(6, [32] * 2), stream(7, [32] * 2)
    for c in (cache, ref):
        for i, (k, v) in enumerate(old):
            c.append(i, k, v)
    cache.compress_ahead(dict(enumerate(new)))
    passes = []
    monkeypatch.setattr(qkv.Policy, "compress_many", lambda self, pairs, **kw: passes.append(pairs))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: passes.append("read-back"))
    for i, (k, v) in enumerate(new):
        cache.layer(i).replace(k, v)
    assert passes == []
    monkeypatch.undo()
    for i, (k, v) in enumerate(new):
        ref.layer(i).replace(k, v)
    assert spans_equal(cache, ref, 2) and cache.memory() == ref.memory()


def test_replace_keeps_the_warm_start_and_refuses_like_append():
    """``replace`` = reset + append, but the new span's k-means starts from the centroids of what
    it replaces; a chunk of another batch size starts cold; a chunk append would refuse changes
    nothing."""
    cache = KVCache(QVG, span_chunks=1)
    layer = cache.layer(0)
    (k0, v0), (k1, v1) = stream(5, [32, 32], h=2)
    layer.append(k0, v0)
    before = layer.spans[0].ckv
    layer.replace(k1, v1)
    assert layer.tokens == 32 and len(layer.spans) == 1 and layer.seen == 32
    warmed = QVG.compress(k1, v1, warm_start=centroids_only(before), validate=False)
    assert torch.equal(layer.spans[0].ckv.k.tensors()["codes"], warmed.k.tensors()["codes"])
    nan = k1.clone()
    nan[0, 0, 0, 0] = float("nan")
    kept = layer.spans[0].ckv
    with pytest.raises(NonFiniteError):
        layer.replace(nan, v1)
    assert layer.spans[0].ckv is kept and kept is not before and layer.tokens == 32
    k2, v2 = (torch.cat([t, t], 0) for t in (k1, v1))  # batch 2: the warm start does not fit
    layer.replace(k2, v2)
    cold = QVG.compress(k2, v2, validate=False)
    assert torch.equal(layer.spans[0].ckv.k.tensors()["codes"], cold.k.tensors()["codes"])


def test_memory_is_exact_and_compression_pays():
    chunks = stream(3, [32] * 10, h=2, dtype=torch.bfloat16)
    cache = KVCache("rtn", span_chunks=4, sink_chunks=1, num_layers=2)
    for k, v in chunks:
        for layer in range(2):
            cache.append(layer, k, v)
    layer = cache.layer(0)
    mem = layer.memory()
    assert mem.compressed == sum(s.ckv.nbytes for s in layer.spans) > 0
    assert mem.sink == 2 * 32 * 2 * 64 * 2  # K and V, 32 tokens, 2 heads, D=64, bf16
    assert mem.tail == sum(c.k.numel() * 2 * 2 for c in layer.tail) and len(layer.tail) == 1
    assert mem.total == mem.compressed + mem.full_precision and mem.warm_start == 0
    assert cache.memory() == mem + cache.layer(1).memory()
    assert mem.tokens == 320 and mem.elements == 2 * 2 * 64 * 320
    span_bits = 8 * mem.compressed / (2 * 2 * 64 * 256)
    assert span_bits == pytest.approx(2.5, abs=0.01) and mem.compressed == 20512  # rtn: INT2 + 8-bit scale / 16 values
    # 256 tokens at 2.5 bits, 64 in the sink and the tail at 16 bits
    assert mem.bits_per_element == 8 * (20512 + 2 * 16384) / (2 * 2 * 64 * 320) == pytest.approx((256 * 2.5 + 64 * 16) / 320, rel=1e-3)


@pytest.mark.parametrize("span", [{}, {"span_chunks": 2}, {"span_tokens": 256}])
def test_kivi_keeps_its_residual_window_and_compresses_each_group_that_leaves_it(span):
    """KIVI (arXiv 2402.02750): the newest R = 128 tokens stay in full precision, and as soon as a
    group of G = 32 tokens (its per-channel key block) has left that window it is quantized, keys
    per channel and values per token, whatever the span options (the default, 8 chunks, is 8
    tokens when decoding token by token). A 300-token prompt, then 100 tokens one at a time."""
    cache = KVCache("kivi", **span)
    layer = cache.layer(0)
    for k, v in stream(3, [300] + [1] * 100):
        cache.append(0, k, v)
        stored = sum(sp.tokens for sp in layer.spans)
        assert stored == (layer.seen - 128) // 32 * 32
        assert 128 <= sum(c.tokens for c in layer.tail) < 128 + 32
    assert len(layer.spans) > 1 and stored == 256
    for sp in layer.spans:
        assert sp.tokens % 32 == 0 and sp.tokens <= span.get("span_tokens", sp.tokens)
        assert "window" not in sp.ckv.spec  # compressed with the window stripped
        assert sp.ckv.k.fp_tokens is None and sp.ckv.v.fp_tokens is None  # every token quantized


def test_a_window_of_a_policy_that_reads_whole_spans_is_a_minimum_tail():
    """With clustering (qvg) a span is only compressed whole, with the window after it."""
    cache = KVCache(qkv.build_policy("qvg", clusters=4, window=48), span_tokens=32)
    layer = cache.layer(0)
    for k, v in stream(4, [16] * 12):
        cache.append(0, k, v)
        assert all(sp.tokens == 32 for sp in layer.spans)
        assert 48 <= sum(c.tokens for c in layer.tail) < 48 + 32 or layer.seen < 48


def test_recent_chunks_stay_exact():
    chunks = stream(5, [4] * 10)
    cache = KVCache(QVG, span_chunks=2, recent_chunks=3)
    for k, v in chunks:
        cache.append(0, k, v)
    layer = cache.layer(0)
    assert len(layer.tail) == 4 and len(layer.spans) == 3
    got_k, _ = cache.read(0)
    assert torch.equal(got_k[:, :, -12:], full(chunks[-3:])[0])


def test_evict_tokens_inside_a_span_drops_them_from_its_data():
    chunks = stream(6, [8] * 7, dtype=torch.bfloat16)
    cache = KVCache("bf16", span_chunks=2, sink_chunks=1)
    for k, v in chunks:
        cache.append(0, k, v)
    layer = cache.layer(0)
    before = layer.memory()
    k_all, _ = full(chunks)
    layer.evict(5)
    per_token = 2 * 2 * 64 * 2  # K and V, 2 heads x 64, bf16
    assert layer.spans[0].skip == 0 and layer.spans[0].tokens == 11 and layer.memory().dead_tokens == 0
    assert layer.memory().compressed == before.compressed - 5 * per_token  # the evicted tokens are freed
    assert torch.equal(cache.read(0)[0], torch.cat([k_all[:, :, :8], k_all[:, :, 13:]], 2))
    layer.evict(11)
    assert len(layer.spans) == 2 and layer.memory().compressed == before.compressed - 16 * per_token
    assert layer.positions().tolist() == list(range(8)) + list(range(24, 56))
    with pytest.raises(CacheError, match="cannot evict"):
        layer.evict(33)


@pytest.mark.parametrize(
    "spec, dead",
    [
        ("rtn", 0),  # per-token codes: every evicted token is dropped
        ("quarot", 0),
        ("kmeans(clusters=4),centroid,int2(block=32)", 0),  # assignments per token, centroids kept
        ("k:int2(block=16,mode=asym,axis=channel),i32lsb;v:int2(block=32)", 21 % 16),  # whole key blocks only
        ("k:int2(block=4,mode=asym,axis=channel),i32lsb;v:int2(block=32)", 21 % 16),  # 16 tokens fill an int32 word
        ("blocks(t=1,h=2,w=2,height=4,width=4),centroid,int2(block=32)", 21),  # groups implied by positions
    ],
)
def test_evict_inside_a_span_keeps_only_what_its_format_cannot_drop(spec, dead):
    """A span partly evicted keeps the tokens its format cannot drop (reported as dead tokens);
    what it keeps is exactly a span of the kept tokens (same bytes as the policy predicts), and
    reads back as before for the retained tokens."""
    policy = qkv.build_policy(spec)
    cache = KVCache(policy, span_tokens=64)
    for k, v in stream(8, [32] * 3):
        cache.append(0, k, v)
    layer = cache.layer(0)
    before = cache.read(0)
    layer.evict(21)
    span = layer.spans[0]
    assert span.skip == dead and span.tokens == 64 - 21 and layer.memory().dead_tokens == dead
    assert span.ckv.k.shape[2] == 64 - 21 + dead
    for tp, ct in ((policy.k, span.ckv.k), (policy.v, span.ckv.v)):
        ct.check()  # the data of a span of its tokens, its centroids kept whole
        fresh = tp.format(64).layout(ct.shape, ct.dtype, ct.groups)
        assert ct.nbytes == sum(math.prod(size) * dt.itemsize for size, dt in fresh.values())
    assert layer.memory().compressed == span.ckv.nbytes
    after = cache.read(0)
    assert torch.equal(after[0], before[0][:, :, 21:]) and torch.equal(after[1], before[1][:, :, 21:])


def test_warm_start_seeds_each_span_with_the_previous_centroids():
    chunks = stream(7, [16] * 6)
    warm = KVCache(QVG, span_chunks=2)  # warm_start is the default
    cold = KVCache(QVG, span_chunks=2, warm_start=False)
    for k, v in chunks:
        warm.append(0, k, v)
        cold.append(0, k, v)
    k_all, v_all = full(chunks)
    spans = warm.layer(0).spans
    for i in (1, 2):
        s = slice(32 * i, 32 * i + 32)
        expected = QVG.compress(k_all[:, :, s], v_all[:, :, s], warm_start=spans[i - 1].ckv)
        assert torch.equal(spans[i].ckv.k.codes, expected.k.codes)
        assert torch.equal(spans[i].ckv.v.stages[0].centroids, expected.v.stages[0].centroids)
    assert not torch.equal(spans[2].ckv.k.codes, cold.layer(0).spans[2].ckv.k.codes)
    layer = warm.layer(0)
    assert layer.warm.k.codes is None and layer.warm.k.stages[0].centroids is spans[-1].ckv.k.stages[0].centroids
    assert layer.memory().warm_start == 0  # shared with the newest span
    assert cold.layer(0).warm is None


def test_index_batch_reorders_every_part():
    chunks = stream(8, [8] * 5, b=3)
    cache = KVCache(QVG, span_chunks=2, sink_chunks=1)
    for k, v in chunks:
        cache.append(0, k, v)
    before = cache.read(0)
    idx = torch.tensor([2, 0, 0, 1])
    cache.layer(0).index_batch(idx)
    after = cache.read(0)
    assert torch.equal(after[0], before[0][idx]) and torch.equal(after[1], before[1][idx])
    assert cache.layer(0).warm_shares_newest_span() and cache.memory().warm_start == 0  # no extra copy
    k, v = stream(9, [8], b=4)[0]
    cache.append(0, k, v)  # the next chunk has the new batch size


def snapshot(cache: KVCache):
    layer = cache.layer(0)
    return (layer.seen, layer.tokens, cache.memory(), *cache.read(0))


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (lambda k, v: (k[0], v[0]), ShapeError, "rank 4"),
        (lambda k, v: (k[:, :1], v[:, :1]), ShapeError, r"\[B, H, D\]"),
        (lambda k, v: (k[..., :32], v[..., :32]), ShapeError, r"\[B, H, D\]"),
        (lambda k, v: (k, v[:, :, :2]), ShapeError, "shapes differ"),
        (lambda k, v: (k[:, :, :0], v[:, :, :0]), ShapeError, "empty"),
        (lambda k, v: (k.double(), v.double()), DTypeError, "float64"),
        (lambda k, v: (k.to(torch.int32), v.to(torch.int32)), DTypeError, "int32"),
        (lambda k, v: (k.half(), v.half()), DTypeError, "the cache holds torch.float32"),
        (lambda k, v: (k, v.half()), DTypeError, "k is torch.float32 but v is torch.float16"),
        (lambda k, v: (k.index_fill(2, torch.tensor([1]), float("nan")), v), NonFiniteError, "NaN/Inf"),
        (lambda k, v: (k, v.index_fill(3, torch.tensor([5]), float("inf"))), NonFiniteError, "NaN/Inf"),
        (lambda k, v: ("k", v), DTypeError, "torch.Tensor"),
    ],
)
def test_bad_chunks_raise_and_leave_the_cache_unchanged(bad, error, message):
    chunks = stream(10, [4] * 5)
    cache = KVCache(QVG, span_chunks=2, sink_chunks=1)
    for k, v in chunks[:4]:
        cache.append(0, k, v)
    before = snapshot(cache)
    with pytest.raises(error, match=message):
        cache.append(0, *bad(*chunks[4]))
    after = snapshot(cache)
    assert before[:3] == after[:3] and torch.equal(before[3], after[3]) and torch.equal(before[4], after[4])
    cache.append(0, *chunks[4])  # still streams
    assert len(cache.layer(0).spans) == 2


def test_a_chunk_the_policy_cannot_take_is_rejected_before_anything_is_stored():
    cache = KVCache("quarot")  # a Hadamard rotation along D
    k = torch.randn(1, 2, 4, 24)
    with pytest.raises(ShapeError, match="power of two"):
        cache.append(0, k, k)
    assert cache.layer(0).layout is None and cache.layer(0).seen == 0
    with pytest.raises(CacheError, match="holds nothing"):
        cache.read(0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"span_chunks": 2, "span_tokens": 8}, "not both"),
        ({"span_chunks": 0}, "span_chunks"),
        ({"sink_chunks": -1}, "sink_chunks"),
        ({"sink_chunks": 1, "sink_tokens": 4}, "not both"),
        ({"sink_tokens": -1}, "sink_tokens"),
        ({"max_spans": 0}, "max_spans"),
        ({"warm_start": 1}, "warm_start"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        KVCache("qvg", **kwargs)


def test_layers_grow_unless_fixed_and_defaults():
    cache = KVCache("qvg")
    assert cache.config.span_chunks == 8 and cache.config.span_tokens is None and cache.config.warm_start
    cache.layer(3)
    assert len(cache.layers) == 4
    fixed = KVCache("qvg", num_layers=2)
    with pytest.raises(CacheError, match="outside"):
        fixed.layer(2)
    assert isinstance(CacheMemory() + CacheMemory(), CacheMemory)


def test_reading_a_layer_never_appended_to_creates_nothing():
    cache = KVCache("rtn")  # no num_layers: layers grow on append
    cache.append(0, *stream(0, [4])[0])
    for index in (1, 100_000, 10**9):  # 10**9 hung, creating every layer up to it
        with pytest.raises(CacheError, match=f"layer {index} holds nothing"):
            cache.read(index)
        with pytest.raises(CacheError, match="holds nothing"):
            cache.attend(index, torch.randn(1, 2, 1, 64))
    assert len(cache.layers) == 1


def test_unknown_cache_options_list_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown option.*bogus.*valid options: num_layers, span_chunks"):
        KVCache("rtn", bogus=1)


@pytest.mark.parametrize(
    "index, error, message",
    [
        ([5], CacheError, "row 5 outside the layer's 2 batch rows"),
        ([-1], CacheError, "row -1 outside"),
        ([], ShapeError, "at least one row"),
        ([[0]], ShapeError, "1-D"),
        ([0.0], DTypeError, "integers"),
        (torch.tensor([True, False]), DTypeError, "integers"),
        ("a", DTypeError, "integer tensor"),
    ],
)
def test_index_batch_rejects_rows_it_does_not_have(index, error, message):
    cache = KVCache(QVG, span_chunks=1)
    for k, v in stream(0, [4, 4], b=2):
        cache.append(0, k, v)
    before = cache.read(0)
    with pytest.raises(error, match=message):
        cache.layer(0).index_batch(index)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.read(0)))
    cache.layer(0).index_batch([1, 1, 0])
    assert torch.equal(cache.read(0)[0], before[0][[1, 1, 0]])


@pytest.mark.parametrize("attention", ["fused", "staged", "read"])
def test_attend_checks_its_inputs(attention):
    cache = KVCache(QVG, span_chunks=1, attention=attention)
    for k, v in stream(0, [4, 4]):
        cache.append(0, k.bfloat16(), v.bfloat16())
    q = torch.randn(1, 2, 3, 64)
    bad = q.clone()
    bad[0, 0, 0, 0] = float("nan")  # not read back (no host sync per call): only that query is affected
    torch.testing.assert_close(cache.attend(0, bad)[:, :, 1:], cache.attend(0, q)[:, :, 1:], atol=0, rtol=0)
    for scale in (float("nan"), float("inf"), "a", True):
        with pytest.raises(ConfigError, match="scale must be a finite number"):
            cache.attend(0, q, scale=scale)
    k, v = stream(1, [2])[0]
    with pytest.raises(ShapeError, match="extra must be a \\(k, v\\) tuple"):
        cache.attend(0, q, extra=[k.bfloat16(), v.bfloat16()])
    with pytest.raises(DTypeError, match="extra: chunk is torch.float32, the cache holds torch.bfloat16"):
        cache.attend(0, q, extra=(k, v))
    # an fp32 query on a bf16 cache: every mode takes it (read failed) and returns fp32
    out = cache.attend(0, q, extra=(k.bfloat16(), v.bfloat16()))
    ref = KVCache(QVG, span_chunks=1, attention="staged")
    for k2, v2 in stream(0, [4, 4]):
        ref.append(0, k2.bfloat16(), v2.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.attend(0, q, extra=(k.bfloat16(), v.bfloat16())), atol=2e-2, rtol=0)


def test_to_returns_the_moved_object_as_torch_does():
    cache = KVCache(QVG, span_chunks=1)
    for k, v in stream(0, [4, 4, 4]):
        cache.append(0, k, v)
    layer = cache.layer(0)
    assert layer.to("cpu") is layer and cache.to("cpu") is cache
    assert torch.equal(layer.to(torch.device("cpu")).read()[0], cache.read(0)[0])


def test_trim_frees_the_tail_buffer_and_keeps_the_tail():
    chunks = stream(6, [8] * 5)
    cache = KVCache(QVG, span_chunks=2)
    for k, v in chunks:
        cache.append(0, k, v)
    layer = cache.layer(0)
    before, q = cache.read(0), torch.randn(1, 2, 3, 64)
    out = cache.attend(0, q, extra=chunks[0])
    assert layer.memory().reserved > 0 and len(layer.tail) == 1
    layer.trim()
    assert layer.memory().reserved == 0 and not layer.buffer.holds(layer.tail[0].k)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.read(0)))
    # the tail and extra now two segments instead of one: merged by log-sum-exp, fp32 rounding apart
    torch.testing.assert_close(out, cache.attend(0, q, extra=chunks[0]), atol=1e-6, rtol=1e-5)
    assert layer.memory().reserved == 0  # attend allocated no buffer
    cache.append(0, *chunks[1])  # the next append makes a buffer again and completes a span
    assert len(layer.spans) == 3 and layer.memory().reserved > 0


def test_a_sink_of_tokens_cuts_the_chunk_it_ends_in():
    """``sink_tokens``: a sink of one 6-token frame with chunks of three frames keeps exactly the
    first frame; the rest of that chunk starts the spans."""
    chunks = stream(3, [18] * 4, d=16, dtype=torch.bfloat16)
    cache = KVCache("bf16", span_tokens=18, sink_tokens=6)
    for k, v in chunks:
        cache.append(0, k, v)
    layer = cache.layer(0)
    assert sum(c.tokens for c in layer.sink) == 6 and [sp.tokens for sp in layer.spans] == [18, 18, 18]
    assert sum(c.tokens for c in layer.tail) == 12 and layer.memory().reserved == 0  # no buffer: a span per chunk
    layer.evict(18)  # a window after the sink evicts whole spans: nothing dead
    assert layer.memory().dead_tokens == 0 and len(layer.spans) == 2
    assert torch.equal(cache.read(0)[0], full(chunks)[0][:, :, layer.positions()])
    saved = KVCache("bf16", span_tokens=18, sink_tokens=6)
    saved.load_state_dict(cache.state_dict())
    assert torch.equal(saved.read(0)[0], cache.read(0)[0])
    state = cache.state_dict()
    state["layers"][0]["sink"] = state["layers"][0]["sink"][:0]
    with pytest.raises(CorruptDataError, match="0 sink tokens"):
        saved.load_state_dict(state)


def test_a_chunk_that_requires_grad_is_refused_not_detached():
    """What is stored is detached (and compressed): a chunk that requires grad under grad mode
    raises instead of silently losing its gradient; under no_grad it is stored."""
    k = torch.randn(1, 2, 8, 16, requires_grad=True)
    cache = KVCache("bf16", span_chunks=2)
    with pytest.raises(GradientError, match="requires grad"):
        cache.append(0, k, k.detach())
    assert cache.layer(0).layout is None
    with torch.no_grad():
        cache.append(0, k, k)
    assert cache.layer(0).tokens == 8


@pytest.fixture
def deferred_checks(monkeypatch):
    """Value checks deferred as on a GPU (:class:`qkv.validation.PendingCheck`), with verdicts
    that arrive only when ``arrived[0]`` is set: what a CUDA device does, on the CPU."""
    arrived = [False]
    monkeypatch.setattr(qkv.validation, "deferred", lambda t: True)
    ready = qkv.validation.PendingCheck.ready
    monkeypatch.setattr(qkv.validation.PendingCheck, "ready", lambda self: arrived[0] and ready(self))
    return arrived


def test_a_deferred_value_check_refuses_the_layer_once_it_arrives(deferred_checks, monkeypatch):
    """On a GPU an append does not wait for its chunk's value check: a bad chunk is stored, the
    next call after the verdict has arrived raises the typed error naming the chunk's tokens, and
    every later call raises it again until reset(); nothing is read back while it is on its way."""
    cache = KVCache(QVG, num_layers=2, span_chunks=1)
    chunks = stream(8, [16] * 3)
    cache.append(0, *chunks[0])
    k, v = (t.clone() for t in chunks[1])
    k[0, 1, 2, 3] = float("inf")
    reads = []
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", lambda self: reads.append(self) or [])
        cache.append(0, k, v)  # stored: the verdict is on its way
        cache.append(1, *chunks[0])
    assert reads == [] and cache.layer(0).tokens == 32
    cache.attend(0, torch.randn(1, 2, 4, 64))  # not arrived yet: nothing to raise
    deferred_checks[0] = True
    for call in (lambda: cache.attend(0, torch.randn(1, 2, 4, 64)), lambda: cache.append(0, *chunks[2]),
                 lambda: cache.read(0), cache.state_dict, cache.layer(0).attention_segments):
        with pytest.raises(NonFiniteError, match=r"layer 0: k holds NaN/Inf values, appended as tokens 16\.\.31.*reset\(\)"):
            call()
    cache.layer(1).settle()  # the other layer is fine
    good = KVCache(QVG, num_layers=1, span_chunks=1)
    good.append(0, *chunks[0])
    cache.layer(0).load_state_dict(good.layer(0).state_dict())  # a loaded state replaces the refused one
    cache.layer(0).settle()
    cache.layer(0).reset()
    cache.append(0, *chunks[0])
    cache.settle()


def test_state_leaves_a_layer_only_after_its_value_checks(deferred_checks):
    """``state_dict`` (and ``to``) wait for the checks still on their way: a bad chunk never
    leaves in a saved state, even when its verdict had not arrived."""
    cache = KVCache(QVG, num_layers=1, span_chunks=1)
    k, v = (t.clone() for t in stream(9, [16])[0])
    v[0, 0, 0, 0] = float("nan")
    cache.append(0, k, v)
    with pytest.raises(NonFiniteError, match="layer 0: v holds NaN/Inf values, appended as tokens 0..15"):
        cache.state_dict()
    with pytest.raises(NonFiniteError):
        cache.to("cpu")


def test_a_deferred_check_of_a_pass_compressed_ahead_blames_only_its_layer(deferred_checks):
    """``compress_ahead`` checks every chunk of the pass in one reduction; when it is deferred,
    each layer that stores its chunk takes its own part of the verdict: the bad chunk's layer is
    refused, the others are not."""
    cache = KVCache(QVG, num_layers=3, span_chunks=1, sink_chunks=1)
    for i, (k, v) in enumerate(stream(10, [16] * 3)):
        cache.append(i, k, v)
    chunks = dict(enumerate(stream(11, [16] * 3)))
    chunks[2][1][0, 1, 0, 0] = float("nan")
    cache.compress_ahead(chunks)
    assert all(cache.layer(i)._ahead is not None for i in range(3))
    for i, (k, v) in chunks.items():
        cache.append(i, k, v)
    deferred_checks[0] = True
    cache.layer(0).settle()
    cache.layer(1).settle()
    with pytest.raises(NonFiniteError, match="layer 2: v holds NaN/Inf values, appended as tokens 16..31"):
        cache.settle()


def test_on_a_gpu_small_appends_are_checked_together(deferred_checks, monkeypatch):
    """Token-by-token appends on a GPU queue one value check per CHECK_BATCH tokens, one reduction
    of K and one of V over the tail's newest tokens (one run of its buffer), whose verdict names
    those tokens; ``settle()`` checks the tokens still waiting."""
    made = []
    init = qkv.validation.PendingCheck.__init__
    monkeypatch.setattr(qkv.validation.PendingCheck, "__init__",
                        lambda self, named: made.append([t.shape[2] for _, t in named]) or init(self, named))
    cache = KVCache(QVG, num_layers=1, span_tokens=4096)
    tokens = stream(13, [1] * (2 * CHECK_BATCH + 3))
    tokens[CHECK_BATCH + 3][0][0, 1, 0, 5] = float("inf")
    for k, v in tokens[: CHECK_BATCH - 1]:
        cache.append(0, k, v)
    assert made == []
    cache.append(0, *tokens[CHECK_BATCH - 1])
    assert made == [[CHECK_BATCH, CHECK_BATCH]]
    for k, v in tokens[CHECK_BATCH:]:
        cache.append(0, k, v)
    assert made == [[CHECK_BATCH, CHECK_BATCH]] * 2
    deferred_checks[0] = True
    with pytest.raises(NonFiniteError, match=rf"layer 0: k holds NaN/Inf values, appended as tokens "
                       rf"{CHECK_BATCH}\.\.{2 * CHECK_BATCH - 1}"):
        cache.attend(0, torch.randn(1, 2, 1, 64))
    waiting = KVCache(QVG, num_layers=1, span_tokens=4096)
    for k, v in tokens[CHECK_BATCH + 1: CHECK_BATCH + 5]:
        waiting.append(0, k, v)
    with pytest.raises(NonFiniteError, match=r"appended as tokens 0\.\.3"):
        waiting.settle()


@given(data=st.data())
def test_a_one_token_append_takes_the_short_way_to_the_same_layer(data):
    """Token-by-token decoding appends through ``LayerCache._append_token`` (the least host work):
    after any mix of one-token and longer chunks, crops and evictions, in every tail configuration
    (span sizes, KIVI's residual, sinks, recent chunks, a span limit), with value checks batched as
    on a GPU or off, the layer holds what the general path makes of the same calls: the same
    tokens, spans, checks and reads."""
    policy = data.draw(st.sampled_from(["bf16", "kivi", "rtn", QVG]))
    options = data.draw(st.sampled_from([{"span_tokens": 4}, {"span_tokens": 9}, {"span_chunks": 2}, {}]))
    options |= data.draw(st.sampled_from([{}, {"sink_tokens": 3}, {"sink_chunks": 1}, {"recent_chunks": 2}]))
    options |= data.draw(st.sampled_from([{}, {"max_spans": 2}, {"validate": False}]))
    sizes = data.draw(st.lists(st.sampled_from([1, 1, 1, 1, 2, 5]), min_size=1, max_size=40))
    actions = data.draw(st.lists(st.sampled_from(["drop", "evict"]), max_size=3))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(sizes) - 1), min_size=len(actions), max_size=len(actions))))
    chunks = stream(data.draw(st.integers(0, 99)), sizes, d=32, dtype=torch.bfloat16)
    short = KVCache(policy, num_layers=1, **options)
    general = KVCache(policy, num_layers=1, **options)
    general.layer(0)._append_token = lambda k, v: False
    taken = []
    take = short.layer(0)._append_token
    short.layer(0)._append_token = lambda k, v: taken.append(take(k, v)) or taken[-1]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(qkv.validation, "deferred", lambda t: True)
        for i, (k, v) in enumerate(chunks):
            for cache in (short, general):
                cache.append(0, k, v)
                layer = cache.layer(0)
                for action in [a for a, at in zip(actions, cuts) if at == i]:
                    if action == "drop" and extent(layer.tail) > 1:
                        layer.drop_newest(1)
                    if action == "evict" and layer.tokens - sum(c.tokens for c in layer.sink) > 1:
                        layer.evict(1)
            a, b = short.layer(0), general.layer(0)
            assert (a.seen, a.tokens, a.evicted, len(a.spans)) == (b.seen, b.tokens, b.evicted, len(b.spans))
            assert a.checks.unchecked == b.checks.unchecked
            assert [w for _, _, w in a.checks.pending] == [w for _, _, w in b.checks.pending]
            for x, y in zip(short.read(0), general.read(0)):
                assert torch.equal(x, y)
        short.settle()
        general.settle()


@pytest.mark.parametrize("policy", ["kivi", "rtn", "bf16"])
def test_token_by_token_decoding_appends_the_short_way(policy, deferred_checks):
    """After a prompt, every one-token append takes the short way but the few after which the tail
    buffer is laid out anew (its room used up: at most one a span)."""
    cache = KVCache(policy, num_layers=1, span_tokens=64)
    cache.append(0, *stream(16, [100])[0])
    layer, taken = cache.layer(0), []
    take = layer._append_token
    layer._append_token = lambda k, v: taken.append(take(k, v)) or taken[-1]
    for k, v in stream(17, [1] * 256):
        cache.append(0, k, v)
    assert sum(taken) >= 256 - 256 // 32


@pytest.mark.parametrize("action", ["compressed", "evicted", "dropped", "rows"])
def test_tokens_waiting_for_their_check_are_checked_before_they_are_compressed_evicted_dropped_or_reordered(
    deferred_checks, action
):
    """A token whose check waits for more tokens (on a GPU) is checked before it is compressed
    into a span, evicted, dropped (assisted decoding's crop) or its batch rows reordered: a bad
    value never leaves the tail unchecked."""
    cache = KVCache(QVG, num_layers=1, span_tokens=8)
    layer = cache.layer(0)
    tokens = stream(14, [1] * 8)
    tokens[2][1][0, 0, 0, 0] = float("inf")
    for k, v in tokens[:5]:
        cache.append(0, k, v)
    assert layer.checks.pending == [] and layer.checks.unchecked == 5
    actions = {
        "compressed": lambda: [cache.append(0, k, v) for k, v in tokens[5:]],  # a span of tokens 0..7
        "evicted": lambda: layer.evict(3),
        "dropped": lambda: layer.drop_newest(3),
        "rows": lambda: layer.index_batch([0]),
    }
    actions[action]()
    assert len(layer.checks.pending) == 1 and layer.checks.unchecked == 0
    deferred_checks[0] = True
    with pytest.raises(NonFiniteError, match=r"layer 0: v holds NaN/Inf values, appended as tokens 0\.\."):
        layer.settle(wait=False)


def test_an_append_that_fails_leaves_no_check_of_its_chunk(deferred_checks, monkeypatch):
    """An append whose span compression fails leaves the layer as it was: the tokens waiting for
    their check still wait, and no check of the refused chunk is queued."""
    cache = KVCache(QVG, num_layers=1, span_tokens=8)
    layer = cache.layer(0)
    tokens = stream(15, [1] * 8)
    for k, v in tokens[:7]:
        cache.append(0, k, v)
    compress = layer._compress

    def fails(*args):
        raise RuntimeError("compression failed")

    monkeypatch.setattr(layer, "_compress", fails)
    with pytest.raises(RuntimeError, match="compression failed"):
        cache.append(0, *tokens[7])  # completes a span: its tokens' check was queued, then refused
    assert layer.tokens == 7 and layer.checks.unchecked == 7 and layer.checks.pending == []
    monkeypatch.setattr(layer, "_compress", compress)
    cache.append(0, *tokens[7])
    assert layer.checks.unchecked == 0 and [where for _, _, where in layer.checks.pending] == ["tokens 0..7"]


def test_no_value_check_is_queried_or_made_while_a_graph_is_captured(deferred_checks, monkeypatch):
    """While a CUDA graph is being captured (where an event may not be queried) a pending check
    counts as not arrived, and an append that would check values is refused with a clear error."""
    cache = KVCache(QVG, num_layers=1, span_chunks=1)
    chunks = stream(12, [16] * 2)
    cache.append(0, *chunks[0])
    deferred_checks[0] = True
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    check = cache.layer(0).checks.pending[0][0]

    class Event:  # what a CUDA event is to the check; querying it during capture is an error
        def query(self):
            raise AssertionError("an event was queried during capture")

    check._peaks._event = Event()  # its peaks on their way (qkv.readback.Arriving)
    assert not check.ready()
    cache.attend(0, torch.randn(1, 2, 4, 64))  # looks at its checks without querying them
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with pytest.raises(ConfigError, match="validate=False"):
        cache.append(0, *chunks[1])



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_an_append_makes_no_host_sync_and_a_bad_chunk_raises_later():
    cache = KVCache("qvg", num_layers=1, span_chunks=1)
    k = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    cache.append(0, k, k.clone())
    bad = k.clone()
    bad[0, 3, 5, 7] = float("nan")
    torch.cuda.set_sync_debug_mode("error")
    try:
        cache.append(0, bad, k.clone())  # a host sync here would raise
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(NonFiniteError, match="layer 0: k holds NaN/Inf values, appended as tokens 1024..2047"):
        cache.settle()
    cache.reset()
    cache.append(0, k, k.clone())
    cache.settle()
