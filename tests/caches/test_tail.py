"""The tail buffer: chunks are adjacent views of one buffer, joined instead of concatenated."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.caches.tail import Chunk
from qkv.caches.tail import TailBuffer, adjacent, joined, stacked
from qkv.kernels import attention_torch

pytestmark = pytest.mark.usefixtures("one_thread")


def chunk(gen: torch.Generator, tokens: int, b: int = 2, h: int = 3, d: int = 64, dtype=torch.float32):
    return torch.randn(b, h, tokens, d, generator=gen).to(dtype), torch.randn(b, h, tokens, d, generator=gen).to(dtype)


def test_joined_merges_adjacent_views_only():
    buf = torch.randn(2, 3, 20, 4)
    a, b, c = buf[:, :, :5], buf[:, :, 5:9], buf[:, :, 10:12]
    assert adjacent(a, b) and not adjacent(b, c) and not adjacent(b, a)
    out = joined([a, b, c])
    assert len(out) == 2 and torch.equal(out[0], buf[:, :, :9]) and out[1] is c
    assert out[0].untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # a view, no copy
    other = torch.randn(2, 3, 4, 4)
    assert len(joined([a, other])) == 2 and len(joined([buf[:1, :, :5], buf[:1, :, 5:9]])) == 1


@given(rows=st.lists(st.integers(1, 3), min_size=2, max_size=4), gap=st.integers(0, 1), tokens=st.integers(0, 5),
       shuffle=st.booleans())
def test_stacked_is_the_concatenation_and_a_view_only_of_back_to_back_rows(rows, gap, tokens, shuffle):
    """``stacked`` equals ``torch.cat`` along the batch for any parts; it is one view of the
    storage (no copy) exactly when the parts lie back to back in it, in order, with equal strides:
    a gap between them, or parts out of order, give a concatenated copy."""
    buf = torch.randn(sum(rows) + gap * len(rows), 3, 8, 4)
    parts, at = [], 0
    for r in rows:
        parts.append(buf[at : at + r, :, tokens : tokens + 3])  # a token slice: rows stride over it
        at += r + gap
    if shuffle:
        parts = parts[::-1]
    out = stacked(parts)
    assert torch.equal(out, torch.cat(parts))
    one_view = gap == 0 and not shuffle
    assert (out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()) == one_view
    assert adjacent(parts[0], parts[1], dim=0) == one_view


@pytest.mark.parametrize("sizes", [[4, 4, 4, 4, 4], [3, 7, 1, 9, 2, 6], [1] * 12])
def test_append_keeps_every_chunk_and_one_run(sizes):
    gen = torch.Generator().manual_seed(len(sizes))
    buf, tail, expect, start = TailBuffer(), [], [], 0
    for i, n in enumerate(sizes):
        k, v = chunk(gen, n)
        tail = buf.append(tail, k, v, start, planned=8)
        expect.append((k, v, start))
        start += n
        if i % 3 == 2:  # the cache compresses the front away now and then: drop it
            tail, expect = tail[2:], expect[2:]
        assert [c.start for c in tail] == [s for _, _, s in expect]
        for c, (k, v, _) in zip(tail, expect):
            assert torch.equal(c.k, k) and torch.equal(c.v, v) and buf.holds(c.k) and buf.holds(c.v)
        assert len(joined([c.k for c in tail])) == (1 if tail else 0)
    assert buf.capacity >= sum(c.tokens for c in tail)


def test_stage_writes_after_the_tail_and_leaves_it_unchanged():
    gen = torch.Generator().manual_seed(1)
    buf, tail = TailBuffer(), []
    for i in range(3):
        tail = buf.append(tail, *chunk(gen, 4), start=4 * i, planned=16)
    before = [(c.k.clone(), c.v.clone()) for c in tail]
    ek, ev = chunk(gen, 4)
    k, v = buf.stage(tail, ek, ev)
    assert torch.equal(k, torch.cat([*(c.k for c in tail), ek], 2)) and torch.equal(v, torch.cat([*(c.v for c in tail), ev], 2))
    assert buf.holds(k) and all(torch.equal(c.k, bk) and torch.equal(c.v, bv) for c, (bk, bv) in zip(tail, before))
    assert buf.stage(tail, *chunk(gen, 5)) is None  # 12 + 5 > 16: no room
    assert buf.stage(tail, *chunk(gen, 4, dtype=torch.float16)) is None  # another dtype
    cut = [Chunk(tail[0].k.clone(), tail[0].v.clone(), 0), *tail[1:]]  # not one run of the buffer
    assert buf.stage(cut, ek, ev) is None


def test_cache_tail_lives_in_one_buffer_and_reports_its_room():
    cache = qkv.KVCache(qkv.build_policy("qvg", clusters=4), span_chunks=3, num_layers=1)
    gen = torch.Generator().manual_seed(2)
    layer = cache.layer(0)
    for i in range(5):
        cache.append(0, *chunk(gen, 8))
        assert len(joined([c.k for c in layer.tail])) == (1 if layer.tail else 0)
        mem = layer.memory()
        assert mem.reserved + mem.tail == layer.buffer.nbytes and mem.allocated == mem.total + mem.reserved
    assert layer.buffer.capacity == (3 + 1) * 8  # a span and one chunk: the planned room, no growth


@pytest.mark.parametrize("name", qkv.list_policies())
def test_spans_share_no_storage_with_the_tail_buffer(name):
    """Compression copies what it stores (a cast policy's codes too): later appends overwrite the
    buffer a span was compressed from, and the span must not change."""
    cache = qkv.KVCache(qkv.build_policy(name), span_chunks=2, num_layers=1)
    gen = torch.Generator().manual_seed(3)
    layer = cache.layer(0)
    while not layer.spans:  # KIVI keeps its window of newer tokens before it compresses
        cache.append(0, *chunk(gen, 64, b=1, h=2, d=64, dtype=torch.bfloat16))
    span = layer.spans[0]
    first = [t.clone() for t in span.ckv.k.tensors().values()]
    buffers = {layer.buffer.k.untyped_storage().data_ptr(), layer.buffer.v.untyped_storage().data_ptr()}
    for ct in (span.ckv.k, span.ckv.v):
        assert not {t.untyped_storage().data_ptr() for t in ct.tensors().values()} & buffers
    for _ in range(3):
        cache.append(0, *chunk(gen, 64, b=1, h=2, d=64, dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(first, span.ckv.k.tensors().values()))


@pytest.mark.parametrize("name", ["qvg", "rtn", "quarot", "bf16", "kivi"])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_span_is_compressed_from_the_buffer_without_a_copy(name, batch, monkeypatch):
    """Keys and values share one buffer, keys first: a policy that compresses both in one pass
    reads them stacked along the batch as one view of it (no span-sized copy, no peak of a span's
    bytes), and stores what it stores from a copy of the same values."""
    policy = qkv.build_policy(name, **({"clusters": 8} if name == "qvg" else {}))
    seen = []
    compress = qkv.caches.policy.TensorPolicy._compress
    monkeypatch.setattr(qkv.caches.policy.TensorPolicy, "_compress",
                        lambda self, x, *a: seen.append((x.untyped_storage().data_ptr(), x.clone())) or compress(self, x, *a))
    cache = qkv.KVCache(policy, span_chunks=2, num_layers=1)
    layer, gen = cache.layer(0), torch.Generator().manual_seed(5)
    while not layer.spans:
        cache.append(0, *chunk(gen, 64, b=batch, h=2, d=64, dtype=torch.bfloat16))
    buffer = layer.buffer.k.untyped_storage().data_ptr()
    assert layer.buffer.v.untyped_storage().data_ptr() == buffer
    assert [ptr == buffer for ptr, _ in seen] == [True] * (1 if policy.k == policy.v else 2)
    if policy.k == policy.v:
        x = seen[0][1]
        assert x.shape[0] == 2 * batch  # keys, then values
        again = policy.k._compress(x.contiguous(), None, "auto")
        span = layer.spans[0].ckv
        for field, t in again.tensors().items():
            assert torch.equal(t[:batch], span.k.tensors()[field]) and torch.equal(t[batch:], span.v.tensors()[field])


@pytest.mark.parametrize("attention", ["staged", "fused", "read"])
def test_attend_with_the_current_chunk_staged_in_the_buffer(attention):
    config = dict(span_chunks=3, sink_chunks=1, backend="torch", attention=attention)
    cache = qkv.KVCache(qkv.build_policy("qvg", clusters=4), num_layers=1, **config)
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):  # sink, one span, two tail chunks
        cache.append(0, *chunk(gen, 8))
    layer = cache.layer(0)
    q = torch.randn(2, 6, 5, 64, generator=gen)
    extra = chunk(gen, 8)
    k, v = layer.read()
    expect = attention_torch(q, [qkv.kernels.DenseKV(torch.cat([k, extra[0]], 2), torch.cat([v, extra[1]], 2))])
    tail = [(c.k.clone(), c.v.clone()) for c in layer.tail]
    segments = layer.attention_segments(extra)
    assert len(segments) == 3  # sink, span, tail + current chunk in one view
    torch.testing.assert_close(layer.attend(q, extra=extra), expect, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(c.k, a) and torch.equal(c.v, b) for c, (a, b) in zip(layer.tail, tail))
    # a chunk too big for the room is attended to as a segment of its own
    big = chunk(gen, 40)
    assert len(layer.attention_segments(big)) == 4
    full_k, full_v = torch.cat([k, big[0]], 2), torch.cat([v, big[1]], 2)
    torch.testing.assert_close(
        layer.attend(q, extra=big), attention_torch(q, [qkv.kernels.DenseKV(full_k, full_v)]), rtol=1e-5, atol=1e-5
    )


def test_evicting_tail_tokens_keeps_the_tail_in_the_buffer():
    """Tokens evicted from the front of the tail leave the rest as views of the buffer (no copy);
    their room counts as reserved and the next placement reuses it."""
    cache = qkv.KVCache("rtn", span_chunks=8, num_layers=1)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        cache.append(0, *chunk(gen, 8))
    layer = cache.layer(0)
    before, storage = layer.memory(), layer.buffer.k.untyped_storage().data_ptr()
    kept = [t[:, :, 10:].clone() for t in layer.read()]
    layer.evict(10)
    assert all(layer.buffer.holds(c.k) for c in layer.tail) and len(joined([c.k for c in layer.tail])) == 1
    mem = layer.memory()
    assert mem.tail == before.tail - 10 * 2 * 2 * 3 * 64 * 4 and mem.allocated == before.allocated
    cache.append(0, *chunk(gen, 8))
    assert layer.buffer.k.untyped_storage().data_ptr() == storage
    assert all(torch.equal(a[:, :, :14], b) for a, b in zip(layer.read(), kept))


def test_tail_moved_by_index_batch_and_evict_is_copied_back_on_append():
    cache = qkv.KVCache("rtn", span_chunks=8, num_layers=1)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        cache.append(0, *chunk(gen, 8))
    layer = cache.layer(0)
    layer.evict(4)  # cuts the first tail chunk
    layer.index_batch(torch.tensor([1, 0]))  # moves the tail out of the buffer
    before = layer.read()
    cache.append(0, *chunk(gen, 8))
    after = layer.read()
    assert torch.equal(after[0][:, :, : before[0].shape[2]], before[0])
    assert all(layer.buffer.holds(c.k) for c in layer.tail) and len(joined([c.k for c in layer.tail])) == 1
    assert dataclasses.replace(layer.memory(), reserved=0).tail == sum(2 * c.k.numel() * 4 for c in layer.tail)


def test_token_by_token_appends_do_not_walk_the_tail(monkeypatch):
    """Decoding appends a one-token chunk a step and attends: an append finds the tail's end and
    counts its tokens, and the attention takes the tail as one segment, without visiting its
    chunks (the tail grew to thousands of chunks before a span); the count from positions matches
    the chunks through evictions, rollbacks and a cut sink."""
    import qkv.caches.tail as tail_module

    gen = torch.Generator().manual_seed(5)
    cache = qkv.KVCache("bf16", span_tokens=512, sink_tokens=3)
    layer = cache.layer(0)
    layer.append(*chunk(gen, 5))  # the sink takes 3 of them
    for _ in range(300):
        layer.append(*chunk(gen, 1))
    calls = []
    monkeypatch.setattr(tail_module, "adjacent", lambda a, b: calls.append(1) or adjacent(a, b))
    layer.append(*chunk(gen, 1))
    sink, plan, tail = layer.attention_segments()
    assert len(layer.tail) > 300 and not calls
    assert torch.equal(tail.k, torch.cat([c.k for c in layer.tail], 2)) and layer.buffer.holds(tail.k)
    assert torch.equal(tail.v, torch.cat([c.v for c in layer.tail], 2)) and sink.k.shape[2] == 3
    monkeypatch.undo()
    for step in (lambda: layer.evict(7), lambda: layer.drop_newest(4), lambda: layer.append(*chunk(gen, 9)),
                 lambda: layer.evict(1), lambda: layer.append(*chunk(gen, 1))):
        step()
        assert tail_module.extent(layer.tail) == sum(c.tokens for c in layer.tail)
    k, v = layer.read()
    assert k.shape[2] == layer.tokens == 5 + 301 - 7 - 4 + 9 - 1 + 1


def test_a_residual_window_compresses_its_groups_without_walking_the_tail(monkeypatch):
    """KIVI's residual window compresses each group that leaves its 128 tokens as tokens come one
    by one: the group is taken as one view of the buffer, and the tail left after it stays the
    buffer's known run, so no append visits the tail's ~130 one-token chunks; the values read
    back are the tokens appended, and the spans equal those of the same stream appended at once."""
    import qkv.caches.tail as tail_module

    gen = torch.Generator().manual_seed(9)
    stream = [chunk(gen, 1, dtype=torch.bfloat16) for _ in range(400)]
    cache = qkv.KVCache("kivi", num_layers=1)
    layer = cache.layer(0)
    for c in stream[:200]:
        layer.append(*c)
    calls = []
    monkeypatch.setattr(tail_module, "adjacent", lambda a, b: calls.append(1) or adjacent(a, b))
    for c in stream[200:]:
        layer.append(*c)
    monkeypatch.undo()
    assert not calls and len(layer.spans) > 5 and 128 <= len(layer.tail) < 160
    whole = qkv.KVCache("kivi", num_layers=1).layer(0)
    for i in range(0, 400, 100):
        whole.append(torch.cat([c[0] for c in stream[i : i + 100]], 2), torch.cat([c[1] for c in stream[i : i + 100]], 2))
    k, v = (torch.cat([c[i] for c in stream], 2) for i in (0, 1))
    tail_k, tail_v = (torch.cat([getattr(c, x) for c in layer.tail], 2) for x in "kv")
    assert torch.equal(tail_k, k[:, :, -tail_k.shape[2]:]) and torch.equal(tail_v, v[:, :, -tail_v.shape[2]:])
    assert torch.equal(layer.read()[0], whole.read()[0]) and torch.equal(layer.read()[1], whole.read()[1])


@pytest.mark.parametrize("prompt", [10, 300])
def test_decoding_after_a_prompt_keeps_the_residual_window_in_place(monkeypatch, prompt):
    """Token-by-token decoding after a prompt (KIVI, its checks batched as on a GPU): groups cut
    from the prompt's chunk leave its rest as a view of the buffer, still the buffer's known run
    (a copy was not, and every such group made the next append walk the tail and move it), and
    the buffer leaves room for a window and a group of one-token chunks (it was planned for one:
    the tail moved to the front every few tokens). Over 600 tokens no append walks the tail and
    the tail moves at most once per 160 tokens; the values read back are those of the same stream
    appended in chunks of 100."""
    import qkv.caches.tail as tail_module
    from qkv import validation

    monkeypatch.setattr(validation, "deferred", lambda t: True)
    gen = torch.Generator().manual_seed(11)
    first = chunk(gen, prompt, dtype=torch.bfloat16)
    stream = [chunk(gen, 1, dtype=torch.bfloat16) for _ in range(600)]
    layer = qkv.KVCache("kivi", num_layers=1).layer(0)
    layer.append(*first)
    layer.append(*stream[0])
    walks, moves = [], []
    monkeypatch.setattr(tail_module, "adjacent", lambda a, b: walks.append(1) or adjacent(a, b))
    place = TailBuffer._place
    monkeypatch.setattr(TailBuffer, "_place", lambda self, *a, **kw: moves.append(1) or place(self, *a, **kw))
    for c in stream[1:]:
        layer.append(*c)
    monkeypatch.undo()
    assert not walks and len(moves) <= 600 // 160 and len(layer.spans) > 10
    whole = qkv.KVCache("kivi", num_layers=1).layer(0)
    whole.append(*first)
    for i in range(0, 600, 100):
        whole.append(*(torch.cat([c[j] for c in stream[i : i + 100]], 2) for j in (0, 1)))
    assert torch.equal(layer.read()[0], whole.read()[0]) and torch.equal(layer.read()[1], whole.read()[1])


def test_a_bounded_layer_gives_back_the_room_of_a_long_chunk():
    """``LayerCache.bound_to``: a chunk longer than the window (a prompt) takes the room it needs;
    the eviction that cuts it to the window moves the tail into a buffer of at most 1.5 windows,
    and token-by-token appends, each followed by the window's eviction, stay within it and read
    back exactly the window's tokens."""
    window = 24
    cache = qkv.KVCache("fp32", span_tokens=16, num_layers=1)
    layer = cache.layer(0)
    layer.bound_to(window)
    gen = torch.Generator().manual_seed(7)
    stream = [chunk(gen, 200)]
    cache.append(0, *stream[0])
    layer.evict(layer.tokens - window)
    for _ in range(60):
        stream.append(chunk(gen, 1))
        cache.append(0, *stream[-1])
        layer.evict(layer.tokens - window)
        assert layer.buffer.capacity <= int(1.5 * window) + 1
    k = torch.cat([c[0] for c in stream], 2)
    v = torch.cat([c[1] for c in stream], 2)
    assert all(torch.equal(a, b) for a, b in zip(layer.read(), (k[:, :, -window:], v[:, :, -window:])))
    mem = layer.memory()
    assert mem.reserved <= (int(1.5 * window) + 1) * 2 * 2 * 3 * 64 * 4


def test_a_bounded_layer_shrinks_a_buffer_a_long_chunk_grew():
    """A tail held in a buffer larger than the bound allows (a chunk longer than the window)
    moves into one of 1.5 windows at the eviction that cuts it, values unchanged."""
    cache = qkv.KVCache("fp32", span_chunks=8, num_layers=1)
    layer = cache.layer(0)
    layer.bound_to(10)
    gen = torch.Generator().manual_seed(8)
    k, v = chunk(gen, 40)
    cache.append(0, k, v)
    assert layer.buffer.capacity >= 40
    layer.evict(32)
    assert 8 <= layer.buffer.capacity <= 15 and all(layer.buffer.holds(c.k) for c in layer.tail)
    assert all(torch.equal(a, b) for a, b in zip(layer.read(), (k[:, :, 32:], v[:, :, 32:])))
    with pytest.raises(qkv.errors.ConfigError):
        layer.bound_to(0)


@given(data=st.data())
def test_a_bounded_layer_holds_the_window_exactly_whatever_the_chunks(data):
    """Random chunk sizes (a prompt longer than the window included), spans of any length or a
    residual window, each append followed by the window's eviction: what the layer reads back is
    always the newest tokens of the stream (lossless policies), and after an eviction the tail
    buffer is never larger than the bound allows (1.5 windows, or what the last chunk plans)."""
    window = data.draw(st.integers(4, 40), label="window")
    policy, options = data.draw(st.sampled_from([
        ("fp32", {"span_tokens": 8}), ("fp32", {"span_chunks": 2}), ("bf16", {"span_tokens": 64}),
        ("k:fp32,window(tokens=4);v:fp32,window(tokens=4)", {"span_tokens": 16}),
    ]), label="policy")
    sizes = data.draw(st.lists(st.integers(1, 3 * window), min_size=1, max_size=12), label="chunks")
    layer = qkv.KVCache(policy, num_layers=1, **options).layer(0)
    layer.bound_to(window)
    gen = torch.Generator().manual_seed(0)
    stream_k, stream_v = [], []
    for n in sizes:
        k, v = chunk(gen, n, b=1, h=2, d=8, dtype=torch.bfloat16)  # every policy here stores bf16 exactly
        stream_k.append(k)
        stream_v.append(v)
        layer.append(k, v)
        layer.evict(max(layer.tokens - window, 0))
        held = layer.tokens
        assert held == min(window, sum(x.shape[2] for x in stream_k))
        k_all, v_all = torch.cat(stream_k, 2), torch.cat(stream_v, 2)
        got_k, got_v = layer.read()
        assert torch.equal(got_k, k_all[:, :, -held:]) and torch.equal(got_v, v_all[:, :, -held:])
        assert layer.buffer.capacity <= max(-(-3 * window // 2), layer._planned(n))


@given(data=st.data())
def test_attention_segments_hold_exactly_the_history_whatever_the_steps(data):
    """Random appends (one-token steps among them), evictions, rollbacks of the newest tokens, and
    attention with or without a current chunk (staged in the buffer's free room): the attention
    segments (sink, span plan, tail, extra), read in order, are always the retained history and
    then the extra chunk (lossless policies), whether the tail is the buffer's known run or was
    cut since."""
    policy, options = data.draw(st.sampled_from([
        ("fp32", {"span_tokens": 8}), ("bf16", {"span_chunks": 3, "sink_tokens": 3}),
        ("k:fp32,window(tokens=4);v:fp32,window(tokens=4)", {"span_tokens": 16}),
        ("bf16", {"span_tokens": 12, "recent_chunks": 1}),
    ]), label="policy")
    layer = qkv.KVCache(policy, num_layers=1, **options).layer(0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        step = data.draw(st.sampled_from(["append", "token", "evict", "drop"]), label="step")
        if step in ("append", "token"):
            layer.append(*chunk(gen, 1 if step == "token" else data.draw(st.integers(1, 7)), b=1, h=2, d=8,
                                dtype=torch.bfloat16))
        elif step == "evict" and layer.tokens:
            layer.evict(data.draw(st.integers(0, sum(s.tokens for s in layer.spans) + sum(c.tokens for c in layer.tail))))
        elif step == "drop" and layer.tail:
            # within the newest chunk (cutting it) or across chunks
            newest, held = layer.tail[-1].tokens, sum(c.tokens for c in layer.tail)
            layer.drop_newest(data.draw(st.one_of(st.integers(0, newest), st.integers(0, held))))
        extra = chunk(gen, data.draw(st.integers(0, 3), label="extra"), b=1, h=2, d=8, dtype=torch.bfloat16)
        if layer.layout is None or not layer.tokens + extra[0].shape[2]:
            continue
        parts = [seg.materialize() for seg in layer.attention_segments(extra if extra[0].shape[2] else None)
                 if seg.tokens]
        k, v = layer.read()
        assert layer.tokens == k.shape[2]
        assert torch.equal(torch.cat([p[0] for p in parts], 2), torch.cat([k, extra[0]], 2))
        assert torch.equal(torch.cat([p[1] for p in parts], 2), torch.cat([v, extra[1]], 2))
