"""A layer's cache moved as compressed bytes: packed and unpacked exactly, sent and broadcast
between gloo ranks, checked on arrival, and several times smaller than the bf16 history."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

import qkv
from qkv.caches.transfer import broadcast_layer, pack_layer, recv_layer, send_layer, unpack_layer
from qkv.compressed import pack, unpack
from qkv.errors import CorruptDataError
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [
    ("qvg", {"clusters": 4}, {"span_chunks": 2, "sink_chunks": 1}),
    ("kivi", {"block": 16, "window": 8}, {"span_tokens": 16, "max_spans": 2}),
    ("quarot", {}, {"span_chunks": 3}),
    ("bf16", {}, {"span_chunks": 2}),
]


def chunks(seed: int, n: int, heads: int = 2, tokens: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, heads, tokens, 64, generator=gen).bfloat16(), torch.randn(1, heads, tokens, 64, generator=gen).bfloat16())
            for _ in range(n)]


def filled(name, overrides, options, n=7):
    cache = qkv.KVCache(qkv.build_policy(name, **overrides), **options)
    for k, v in chunks(0, n):
        cache.append(0, k, v)
    return cache


def same_reads(a: qkv.KVCache, b: qkv.KVCache) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.read(0), b.read(0)))


@pytest.mark.parametrize("name", qkv.list_policies())
def test_a_span_packs_and_unpacks_exactly(name):
    k, v = chunks(1, 1, tokens=200)[0]
    ckv = qkv.build_policy(name, **({"clusters": 8} if "qvg" in name else {})).compress(k, v)
    buffer, header = pack(ckv)
    back = unpack(buffer, header)
    assert buffer.numel() < ckv.nbytes + 16 * 16  # the bytes stored, plus alignment
    for a, b in ((ckv.k, back.k), (ckv.v, back.v)):
        assert a.format == b.format and sorted(a.tensors()) == sorted(b.tensors())
        for name_, t in a.tensors().items():
            assert torch.equal(t.view(torch.uint8), b.tensors()[name_].view(torch.uint8))


@pytest.mark.parametrize("name, overrides, options", CASES)
def test_a_layer_moves_exactly_and_keeps_streaming(name, overrides, options):
    source = filled(name, overrides, options)
    buffer, header = pack_layer(source.layer(0))
    target = qkv.KVCache(qkv.build_policy(name, **overrides), **options)
    unpack_layer(target.layer(0), buffer, header)
    stored = lambda c: dataclasses.replace(c.memory(), reserved=0)  # noqa: E731 (free buffer room is not data)
    assert same_reads(source, target) and stored(target) == stored(source)
    for k, v in chunks(2, 5):  # the moved layer goes on exactly as the original
        source.append(0, k, v)
        target.append(0, k, v)
        assert same_reads(source, target)


def test_a_compressed_layer_moves_in_a_fraction_of_the_bf16_bytes():
    cache = qkv.KVCache(qkv.build_policy("qvg", clusters=16), span_chunks=4)
    for k, v in chunks(3, 16, heads=2, tokens=256):
        cache.append(0, k, v)
    buffer, _ = pack_layer(cache.layer(0))
    history = sum(t.numel() * t.element_size() for t in cache.read(0))
    assert buffer.numel() * 5 < history


def test_a_damaged_package_is_refused_and_changes_nothing():
    source = filled("qvg", {"clusters": 4}, {"span_chunks": 2, "sink_chunks": 1})
    buffer, header = pack_layer(source.layer(0))
    target = filled("qvg", {"clusters": 4}, {"span_chunks": 2, "sink_chunks": 1}, n=3)
    before = target.read(0)
    bad = dict(header, spans=[[dict(header["spans"][0][0], at=buffer.numel()), 0]] + header["spans"][1:])
    with pytest.raises(CorruptDataError, match="outside a buffer"):
        unpack_layer(target.layer(0), buffer, bad)
    with pytest.raises(CorruptDataError):
        unpack_layer(target.layer(0), buffer[:-16], header)
    assert all(torch.equal(x, y) for x, y in zip(before, target.read(0)))


def _worker(rank: int, world: int) -> None:
    for name, overrides, options in CASES:
        source = filled(name, overrides, options)
        moved = qkv.KVCache(qkv.build_policy(name, **overrides), **options)
        if rank == 0:
            send_layer(source, 0, dst=1)
        elif rank == 1:
            recv_layer(moved, 0, src=0)
            assert same_reads(source, moved), name
        shared = qkv.KVCache(qkv.build_policy(name, **overrides), **options)
        if rank == 0:
            shared = source
        broadcast_layer(shared, 0, src=0)
        assert same_reads(source, shared), (name, rank)
    # ranks are numbered within the group: world ranks 1 and 2 are ranks 0 and 1 of ``pair``
    pair = dist.new_group([1, 2])  # every rank creates it
    if rank > 0:
        name, overrides, options = CASES[0]
        source = filled(name, overrides, options)
        target = source if rank == 1 else qkv.KVCache(qkv.build_policy(name, **overrides), **options)
        broadcast_layer(target, 0, src=0, group=pair)
        assert same_reads(source, target)


def test_gloo_ranks_send_and_broadcast_layers_exactly():
    run_ranks(_worker, 3)
