"""Saving a KVCache mid-stream and restoring it resumes bit-exactly; damaged saves are rejected."""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.caches.kvcache import KVCache
from qkv.errors import CorruptDataError
from forgery import forge, read_raw, write_raw
from test_storage import edit_header, edit_tensors

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


@pytest.mark.parametrize("spec", ["qvg", "kivi"])
def test_spans_cut_by_an_eviction_are_saved_and_resume(tmp_path, spec):
    """A span whose first tokens were dropped (qvg: 5 tokens left of 16, with 16 centroids) or
    skipped (kivi: a span of one 32-token key block, longer than span_tokens) saves, loads and
    streams on exactly."""
    policy = qkv.build_policy(spec, **({"clusters": 16} if spec == "qvg" else {"window": 8}))
    a = KVCache(policy, span_tokens=16)
    for k, v in chunks(2, 6):
        a.append(0, k, v)
    a.layer(0).evict(11)
    span = a.layer(0).spans[0]
    assert (span.tokens, span.skip) == ((5, 0) if spec == "qvg" else (21, 11))
    a.save(tmp_path / "cache")
    b = KVCache.load(tmp_path / "cache")
    assert_same_state(a, b)
    for k, v in chunks(3, 3):
        a.append(0, k, v)
        b.append(0, k, v)
    assert_same_state(a, b)


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


# -- mixed-up and forged saves -------------------------------------------------------------------


def saved(folder, seed: int = 5) -> KVCache:
    """A 2-layer cache with a sink, two spans per layer (one partly evicted) and a tail, saved."""
    cache = KVCache(qkv.build_policy("qvg", clusters=4), num_layers=2, span_chunks=2, sink_chunks=1)
    for k, v in chunks(seed, 6, tokens=4):
        cache.append(0, k, v)
        cache.append(1, v, k)
    cache.layer(1).evict(3)
    cache.save(folder)
    return cache


def swap(a, b) -> None:
    data = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(data)


@pytest.mark.parametrize(
    "mix",
    [
        lambda d, other: swap(d / "L0.S0.safetensors", d / "L0.S1.safetensors"),
        lambda d, other: (d / "L1.S0.safetensors").write_bytes((d / "L0.S0.safetensors").read_bytes()),
        lambda d, other: (d / "L0.S1.safetensors").write_bytes((other / "L0.S1.safetensors").read_bytes()),
        lambda d, other: (d / "cache.safetensors").write_bytes((other / "cache.safetensors").read_bytes()),
        lambda d, other: (d / "L1.S1.safetensors").unlink(),
    ],
    ids=["swapped", "other-layer", "other-save", "other-state", "missing"],
)
def test_mixed_up_span_files_are_rejected(tmp_path, mix):
    saved(tmp_path / "a")
    saved(tmp_path / "b", seed=6)
    mix(tmp_path / "a", tmp_path / "b")
    with pytest.raises(CorruptDataError, match="span file|digest"):
        KVCache.load(tmp_path / "a")


def edit_layer(key, value, layer=0):
    return lambda t, h: h["layers"][layer].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (edit_layer("seen", 1256), "1256 tokens seen"),
        (edit_layer("evicted", -1), "evicted must be an integer >= 0"),
        (edit_layer("evicted", 5), "tokens seen"),
        (lambda t, h: h["layers"][1]["spans"][0].__setitem__("skip", -2), "skip must be"),
        (lambda t, h: h["layers"][1]["spans"][0].__setitem__("skip", 8), "skip must be"),
        (lambda t, h: h["layers"][0]["spans"][0].__setitem__("sha256", "0" * 64), "digest differs"),
        (edit_layer("warm", None), "warm start"),
        (edit_layer("sink", 0), "sink"),
        (edit_layer("tail", 10**9), r"tail: .* outside"),
        (edit_layer("layout", {"batch": 2, "heads": 2, "head_dim": 64, "dtype": "torch.float32"}), r"\[B, H, D\]"),
        (lambda t, h: h.__setitem__("num_layers", 10**7), "num_layers"),  # took 45 s and 5 GB
        (lambda t, h: t.__setitem__("L0.tail0.k", torch.full_like(t["L0.tail0.k"], float("nan"))), "NaN"),
        (lambda t, h: t.__setitem__("L0.sink0.v", t["L0.sink0.v"][:, :, :2].contiguous()), "shapes differ"),
        (lambda t, h: t.pop("L1.sink0.k"), "missing"),
        (lambda t, h: h["config"].__setitem__("bogus", 1), "config"),
    ],
)
def test_resigned_states_that_do_not_add_up_are_rejected(tmp_path, edit, match):
    saved(tmp_path)
    forge(tmp_path / "cache.safetensors", edit)
    start = time.perf_counter()
    with pytest.raises(CorruptDataError, match=match):
        KVCache.load(tmp_path)
    assert time.perf_counter() - start < 2


def test_span_files_are_never_read_outside_the_folder(tmp_path):
    """Span files are named by layer and index, never by the file: a path written into the state
    is not followed (version 1 stored one, and opened ``../..``)."""
    saved(tmp_path / "a")
    saved(tmp_path / "b")
    (tmp_path / "b" / "L0.S0.safetensors").unlink()
    forge(tmp_path / "b" / "cache.safetensors",
          lambda t, h: h["layers"][0]["spans"][0].__setitem__("file", "../a/L0.S0.safetensors"))
    with pytest.raises(CorruptDataError, match="span file missing"):
        KVCache.load(tmp_path / "b")


def snapshot_state(cache: KVCache) -> list:
    out = []
    for layer in cache.layers:
        k, v = layer.read() if layer.layout is not None else (None, None)
        out.append((layer.seen, layer.evicted, layer.layout, [s.skip for s in layer.spans], k, v, layer.positions(),
                    layer.warm is None))
    return out


def same_state(a: KVCache, b: KVCache) -> bool:
    if a.config != b.config or a.num_layers != b.num_layers or len(a.layers) != len(b.layers):
        return False
    for x, y in zip(snapshot_state(a), snapshot_state(b)):
        for p, q in zip(x, y):
            if torch.is_tensor(p) != torch.is_tensor(q) or (not torch.equal(p, q) if torch.is_tensor(p) else p != q):
                return False
    return True


@settings(max_examples=40, deadline=timedelta(seconds=5))
@given(data=st.data())
def test_fuzzed_saves_load_identically_or_raise_corrupt_data(tmp_path_factory, data):
    """Random edits of a saved cache: of its layers' header fields and its tensors (signed again or
    not), random bytes of its state or of a span file, or a span file swapped with another."""
    folder = tmp_path_factory.mktemp("fuzz")
    original = saved(folder)
    kind = data.draw(st.sampled_from(["header", "tensors", "bytes", "swap"]))
    state = folder / "cache.safetensors"
    if kind == "bytes":
        target = data.draw(st.sampled_from([state, folder / "L0.S1.safetensors"]))
        raw = bytearray(target.read_bytes())
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        target.write_bytes(bytes(raw))
    elif kind == "swap":
        names = sorted(p.name for p in folder.glob("L*.S*.safetensors"))
        a, b = data.draw(st.permutations(names))[:2]
        swap(folder / a, folder / b)
    else:
        tensors, meta, header = read_raw(state)
        if kind == "header":  # the layers: a forger who re-signs may of course choose another config
            edit_header(data, header["layers"][data.draw(st.integers(0, 1))])
        else:
            edit_tensors(data, tensors)
        write_raw(state, tensors, meta, header, sign=data.draw(st.booleans()))
    try:
        loaded = KVCache.load(folder)
    except CorruptDataError:
        return
    assert same_state(original, loaded)
