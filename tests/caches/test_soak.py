"""Soak: 1,200 chunks through a small cache with a sink and a sliding window of spans.

Memory must stay bounded (exactly periodic once the window is full) and reads must stay correct:
the sink and tail exact, every retained span equal to an independent re-run of the same
compression chain (warm-started k-means included) on the original chunks.
"""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.caches.kvcache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNKS, TOKENS, SPAN, WINDOW = 1200, 4, 4, 3  # 4-token chunks, spans of 4 chunks, 3 spans kept
POLICY = qkv.build_policy("qvg", clusters=4, iters=2, block=32)


def chunk(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk i: a slowly drifting signal plus noise, as deterministic function of i (bf16)."""
    gen = torch.Generator().manual_seed(i)
    base = torch.sin(torch.arange(32) * (1 + i / 300.0))
    k = base + 0.3 * torch.randn(1, 2, TOKENS, 32, generator=gen)
    v = 0.5 * torch.randn(1, 2, TOKENS, 32, generator=gen)
    return k.bfloat16(), v.bfloat16()


def test_soak_memory_bounded_reads_correct():
    cache = KVCache(POLICY, span_chunks=SPAN, sink_chunks=1, max_spans=WINDOW)
    reference = []  # the independent chain: every span's CompressedKV, in order
    previous = None
    totals = []
    for i in range(CHUNKS):
        k, v = chunk(i)
        cache.append(0, k, v)
        layer = cache.layer(0)
        if i >= 1 and i % SPAN == 0:  # chunks 1..4, 5..8, ... complete a span at i = 4, 8, ...
            ks, vs = zip(*(chunk(j) for j in range(i - SPAN + 1, i + 1)))
            warm = {} if previous is None else {"warm_start": previous}
            previous = POLICY.compress(torch.cat(ks, 2), torch.cat(vs, 2), **warm)
            reference.append(previous)
        totals.append(layer.memory().total)
        if i % 7 == 0 or i == CHUNKS - 1:  # every phase of the span cycle (7 and 4 coprime)
            got_k, got_v = cache.read(0)
            retained = reference[-len(layer.spans) :] if layer.spans else []
            k0, v0 = chunk(0)
            exp_k = [k0] + [POLICY.decompress(r)[0] for r in retained] + [c.k for c in layer.tail]
            exp_v = [v0] + [POLICY.decompress(r)[1] for r in retained] + [c.v for c in layer.tail]
            assert torch.equal(got_k, torch.cat(exp_k, 2)) and torch.equal(got_v, torch.cat(exp_v, 2)), i
            for c in layer.tail:  # the tail is the newest chunks, exact
                j = c.start // TOKENS
                assert torch.equal(c.k, chunk(j)[0])
            assert len(layer.spans) == min(WINDOW, len(reference))
            first = TOKENS + (len(reference) - len(retained)) * SPAN * TOKENS  # first retained non-sink token
            assert layer.positions().tolist() == list(range(TOKENS)) + list(range(first, (i + 1) * TOKENS))
    layer = cache.layer(0)
    assert layer.seen == CHUNKS * TOKENS and layer.evicted == (len(reference) - WINDOW) * SPAN * TOKENS
    chunk_bytes = 2 * 2 * TOKENS * 32 * 2  # K and V, 2 heads, bf16
    span_bytes = reference[-1].nbytes
    assert all(r.nbytes == span_bytes for r in reference)
    # bounded: sink + WINDOW spans + at most SPAN - 1 tail chunks, reached and never exceeded
    assert max(totals) == chunk_bytes + WINDOW * span_bytes + (SPAN - 1) * chunk_bytes
    # and exactly periodic once the window is full: the same bytes at the same phase of every span
    steady = range(1 + SPAN * (WINDOW + 1), CHUNKS)
    assert all(totals[i] == totals[i - SPAN] for i in steady)
