"""Heads sharded over 2 processes (gloo): the gathered cache equals the unsharded one, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import qkv
from qkv.caches.sharding import HeadShardedKVCache, head_range
from qkv.errors import ConfigError, ShapeError
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = 4
POLICIES = [
    (qkv.build_policy("qvg", clusters=4), {"span_chunks": 2, "sink_chunks": 1}),  # warm-started after span 0
    (qkv.build_policy("qvg-pro", clusters=4), {"span_chunks": 2, "warm_start": False}),  # every span cold
    (qkv.build_policy("kivi", block=16, window=8), {"span_tokens": 16, "max_spans": 2}),
    (qkv.build_policy("quarot"), {"span_chunks": 3}),
]


def _worker(rank: int, world: int) -> None:
    for policy, options in POLICIES:
        sharded = HeadShardedKVCache(policy, heads=HEADS, num_layers=2, **options)
        full = qkv.KVCache(policy, num_layers=2, **options)
        gen = torch.Generator().manual_seed(0)  # every rank sees the same full-head chunks
        for step in range(7):
            for layer in range(2):
                k = torch.randn(1, HEADS, 8, 64, generator=gen) * (1 + layer)
                v = torch.randn(1, HEADS, 8, 64, generator=gen)
                sharded.append(layer, k, v)
                full.append(layer, k, v)
                got, want = sharded.read_gathered(layer), full.read(layer)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (policy.spec, step, layer)
        assert sharded.layer(0).layout[1] == HEADS // world
        assert any(layer.spans for layer in full.layers)
        assert sharded.total_memory() == full.memory(), policy.spec
        assert sharded.memory().total * world == full.memory().total


def test_two_gloo_ranks_equal_the_unsharded_cache():
    run_ranks(_worker, 2)


def test_head_ranges_and_errors():
    assert [head_range(12, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    with pytest.raises(ConfigError, match="evenly"):
        head_range(12, 0, 5)
    with pytest.raises(ConfigError, match="process group"):
        HeadShardedKVCache("rtn", heads=4)


def test_a_single_rank_group_takes_full_or_local_chunks(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rv'}", rank=0, world_size=1)
    try:
        cache = HeadShardedKVCache("rtn", heads=2, span_chunks=1)
        k = torch.randn(1, 2, 4, 16)
        cache.append(0, k, k)
        assert torch.equal(cache.read_gathered(0)[0], cache.read(0)[0])
        with pytest.raises(ShapeError, match="expected all 2"):
            cache.append(0, k[:, :1].repeat(1, 3, 1, 1), k[:, :1].repeat(1, 3, 1, 1))
    finally:
        dist.destroy_process_group()
