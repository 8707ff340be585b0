"""Saving a KVCache mid-stream and restoring it resumes bit-exactly; damaged saves are rejected."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qkv
from qkv.caches.kvcache import KVCache
from qkv.errors import CorruptDataError

pytestmark = pytest.mark.usefixtures("one_thread")


def chunks(seed: int, n: int, tokens: int = 8, h: int = 2, d: int = 64):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, h, tokens, d, generator=gen), torch.randn(1, h, tokens, d, generator=gen)) for _ in range(n)]


def stored(cache: KVCache) -> qkv.caches.CacheMemory:
    """What is stored; the tail buffer's free room is allocation state (a restored layer allocates
    its buffer on its next append)."""
    return dataclasses.replace(cache.memory(), reserved=0)


def assert_same_state(a: KVCache, b: KVCache) -> None:
    assert a.config == b.config and len(a.layers) == len(b.layers)
    assert stored(a) == stored(b)
    for la, lb in zip(a.layers, b.layers):
        assert (la.seen, la.evicted, la.layout) == (lb.seen, lb.evicted, lb.layout)
        assert torch.equal(la.positions(), lb.positions())
        for x, y in zip(la.read(), lb.read()):
            assert torch.equal(x, y)
        assert len(la.spans) == len(lb.spans)
        for sa, sb in zip(la.spans, lb.spans):
            assert sa.skip == sb.skip
            for name, t in sa.ckv.k.tensors().items():
                assert torch.equal(t, sb.ckv.k.tensors()[name])


@pytest.mark.parametrize(
    "policy, options",
    [
        (qkv.build_policy("qvg", clusters=4), {"span_chunks": 2, "sink_chunks": 1, "warm_start": True}),
        (qkv.build_policy("qvg-pro", clusters=4), {"span_tokens": 12, "max_spans": 2, "warm_start": True}),
        (qkv.build_policy("kivi", window=16), {"span_chunks": 4}),
    ],
)
def test_save_restore_mid_stream_resumes_bit_exactly(tmp_path, policy, options):
    stream = chunks(0, 14)
    a = KVCache(policy, num_layers=2, **options)
    for i, (k, v) in enumerate(stream):
        for layer in range(2):
            a.append(layer, k * (layer + 1), v)
        if i == 6:
            a.save(tmp_path / "cache")
            b = KVCache.load(tmp_path / "cache")
            assert_same_state(a, b)
        if i > 6:
            for layer in range(2):
                b.append(layer, k * (layer + 1), v)
            assert_same_state(a, b)
    assert any(layer.spans for layer in a.layers)


def test_warm_centroids_of_an_evicted_span_are_saved(tmp_path):
    policy = qkv.build_policy("qvg", clusters=4)
    a = KVCache(policy, span_chunks=2, warm_start=True)
    for k, v in chunks(1, 5):
        a.append(0, k, v)
    a.layer(0).evict(a.layer(0).tokens)  # every span gone; the warm start survives
    assert a.layer(0).spans == [] and a.memory().warm_start > 0
    a.save(tmp_path / "c")
    b = KVCache.load(tmp_path / "c")
    assert stored(b) == stored(a)
    for k, v in chunks(2, 4):
        a.append(0, k, v)
        b.append(0, k, v)
    assert_same_state(a, b)


def test_saving_twice_removes_stale_span_files(tmp_path):
    a = KVCache(qkv.build_policy("rtn"), span_chunks=1, max_spans=2)
    for k, v in chunks(3, 5):
        a.append(0, k, v)
    a.save(tmp_path)
    a.layer(0).evict(a.layer(0).tokens)
    a.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.safetensors"]
    assert KVCache.load(tmp_path).layer(0).tokens == 0


def test_damaged_saves_are_rejected(tmp_path):
    a = KVCache(qkv.build_policy("qvg", clusters=4), span_chunks=1, sink_chunks=1)
    for k, v in chunks(4, 3):
        a.append(0, k, v)
    a.save(tmp_path)
    state = tmp_path / "cache.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="checksum"):
        KVCache.load(tmp_path)
    a.save(tmp_path)
    span = next(tmp_path.glob("L0.S*.safetensors"))
    span.write_bytes(span.read_bytes()[:-10])
    with pytest.raises(CorruptDataError):
        KVCache.load(tmp_path)
