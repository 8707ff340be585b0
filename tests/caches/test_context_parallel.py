"""The Wan rollout under diffusers' own context parallelism, on gloo ranks, against one process.

Every rank builds the same tiny ``WanTransformer3DModel`` (random weights, bf16, 4 heads x 32),
runs the single-process rollouts first, then ``model.enable_parallelism(ContextParallelConfig(...))``
and the same rollouts again: diffusers' hooks split the sequence, the qkv processors exchange heads
(Ulysses) or merge partial results (ring). diffusers picks the rank's device as
``rank % torch.accelerator.device_count()``, which divides by zero on a machine without an
accelerator, so here that one count reads 1 while ``enable_parallelism`` runs; everything else
(the mesh on gloo, the split and gather hooks) is diffusers' own.

- Ulysses: outputs equal bit for bit, and every rank's spans hold exactly the bytes of its heads
  of the one-process cache (qvg: k-means is per head, seeded alike for every head).
- Ring: a lossless cache gives the one-process output up to the log-sum-exp merge's rounding;
  with qvg a rank compresses its token shard of each span (checked byte for byte on the first
  block, whose keys are exactly the one-process keys).
"""

from __future__ import annotations

from unittest import mock

import torch

import qkv
from qkv.caches.heads import select_heads
from ranks import run_ranks

HEADS, FPC, FRAMES = 4, 2, 10  # 5 chunks of 2 latent frames, 12 tokens per frame: a sink, 2 spans
OPTIONS = {"span_chunks": 2, "sink_chunks": 1}
POLICIES = {"bf16": qkv.build_policy("bf16"), "qvg": qkv.build_policy("qvg", clusters=4, block=32)}


def _model():
    from qkv.realdata.wan import build_model

    return build_model(num_layers=2, num_attention_heads=HEADS, attention_head_dim=32, ffn_dim=64, text_dim=32,
                       freq_dim=32).to(torch.bfloat16)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, FRAMES, 6, 8, generator=gen).bfloat16()
    return latents, (0.5 * latents + 0.5 * torch.randn(latents.shape, generator=gen)).bfloat16(), \
        torch.randn(1, 8, 32, generator=gen).bfloat16()


def _rollouts(model) -> dict:
    """(policy, key_rope) -> (output [1, 16, FRAMES, 6, 8], the cache): denoising reads, clean appends."""
    from qkv.caches.adapters.wan import rollout

    latents, noisy, text = _inputs()
    out = {}
    for name, policy in POLICIES.items():
        for key_rope in ("before", "after"):
            cache = qkv.KVCache(policy, num_layers=2, **OPTIONS)
            out[name, key_rope] = rollout(model, cache, latents, text, frames_per_chunk=FPC, noisy=noisy,
                                          timestep=500, key_rope=key_rope), cache
    return out


def _parallel(model, ulysses: int, ring: int) -> None:
    from diffusers import ContextParallelConfig

    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))


def _same_bytes(a, b) -> bool:
    return all(
        x.format == y.format and sorted(x.tensors()) == sorted(y.tensors())
        and all(torch.equal(t.view(torch.uint8), y.tensors()[n].view(torch.uint8)) for n, t in x.tensors().items())
        for x, y in ((a.k, b.k), (a.v, b.v))
    )


def _shards(keys: torch.Tensor, part: int, parts: int) -> list[torch.Tensor]:
    """Shard ``part`` of ``parts`` of every chunk of ``keys`` [B, H, S, D]."""
    chunk = FPC * 12
    size = chunk // parts
    return [keys[:, :, c + part * size : c + (part + 1) * size] for c in range(0, keys.shape[2], chunk)]


def _check(rank: int, ulysses: int, ring: int, single: dict, model) -> None:
    u_rank, r_rank = rank % ulysses, rank // ulysses
    h0, h1 = u_rank * HEADS // ulysses, (u_rank + 1) * HEADS // ulysses
    ours = _rollouts(model)
    for (name, key_rope), (out, cache) in ours.items():
        want, full = single[name, key_rope]
        where = (name, key_rope, ulysses, ring, rank)
        if ring == 1:
            assert torch.equal(out, want), where
            for mine, theirs in zip(cache.layers, full.layers):
                assert mine.layout[1] == h1 - h0 and len(mine.spans) == len(theirs.spans) == 2, where
                for sp, ref in zip(mine.spans, theirs.spans):
                    assert _same_bytes(sp.ckv, select_heads(ref.ckv, h0, h1)), where
                for c, ref in zip(mine.sink + mine.tail, theirs.sink + theirs.tail):
                    assert torch.equal(c.k, ref.k[:, h0:h1]) and torch.equal(c.v, ref.v[:, h0:h1]), where
        else:
            # a lossless cache: one process's output up to rounding (merged partials, two bf16 blocks)
            if name == "bf16":
                assert float((out.float() - want.float()).norm() / want.float().norm()) < 1e-2, where
            # the first block's keys are the one-process keys: its shard compresses to the same bytes
            keys, values = single["bf16", key_rope][1].read(0)
            mine = qkv.KVCache(POLICIES[name], **OPTIONS)
            for k, v in zip(_shards(keys[:, h0:h1], r_rank, ring), _shards(values[:, h0:h1], r_rank, ring)):
                mine.append(0, k, v)
            held = cache.layer(0)
            assert held.seen == keys.shape[2] // ring and len(held.spans) == len(mine.layer(0).spans) == 2, where
            assert all(_same_bytes(a.ckv, b.ckv) for a, b in zip(held.spans, mine.layer(0).spans)), where
            assert all(torch.equal(a, b) for a, b in zip(held.read(), mine.read(0))), where


def _worker(rank: int, world: int, degrees: list[tuple[int, int]]) -> None:
    single = _rollouts(_model())
    for ulysses, ring in degrees:
        model = _model()
        _parallel(model, ulysses, ring)
        _check(rank, ulysses, ring, single, model)


def test_ulysses_and_ring_on_two_ranks_equal_one_process():
    run_ranks(_worker, 2, [(2, 1), (1, 2)])


def test_ulysses_times_ring_on_four_ranks_equals_one_process():
    run_ranks(_worker, 4, [(2, 2)])


