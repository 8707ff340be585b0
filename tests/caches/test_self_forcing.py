"""The Self-Forcing cache drop-in: that code's attention runs unchanged on our per-block dicts.

``causal_attention_step`` re-states the cache handling of Self-Forcing's ``CausalWanSelfAttention``
(inference branch; guandeh17/Self-Forcing, wan/modules/causal_model.py) on [B, L, H, D] tensors:
the same index arithmetic, slice writes, left shift after the sink, slice read and ``fill_`` of the
end indices. ``rollout`` re-states the pipeline's loop: per chunk, several denoising calls that
rewrite the chunk's slots, then a clean call, with ``current_start`` in tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.caches.adapters.self_forcing import self_forcing_kv_cache
from qkv.errors import CacheError, NonFiniteError, ShapeError

pytestmark = pytest.mark.usefixtures("one_thread")

B, H, D = 1, 2, 32
FRAME = 6  # tokens per latent frame


def causal_attention_step(q, k, v, kv_cache, current_start, *, local_attn_size, sink_size, max_attention_size):
    """Self-Forcing's cache handling (q, k, v: [B, S, H, D], k already roped); returns [B, S, H, D]."""
    current_end = current_start + q.shape[1]
    sink_tokens = sink_size * FRAME
    kv_cache_size = kv_cache["k"].shape[1]
    num_new_tokens = q.shape[1]
    if (
        local_attn_size != -1
        and current_end > kv_cache["global_end_index"].item()
        and num_new_tokens + kv_cache["local_end_index"].item() > kv_cache_size
    ):
        num_evicted = num_new_tokens + kv_cache["local_end_index"].item() - kv_cache_size
        num_rolled = kv_cache["local_end_index"].item() - num_evicted - sink_tokens
        kv_cache["k"][:, sink_tokens : sink_tokens + num_rolled] = kv_cache["k"][
            :, sink_tokens + num_evicted : sink_tokens + num_evicted + num_rolled
        ].clone()
        kv_cache["v"][:, sink_tokens : sink_tokens + num_rolled] = kv_cache["v"][
            :, sink_tokens + num_evicted : sink_tokens + num_evicted + num_rolled
        ].clone()
        local_end = kv_cache["local_end_index"].item() + current_end - kv_cache["global_end_index"].item() - num_evicted
    else:
        local_end = kv_cache["local_end_index"].item() + current_end - kv_cache["global_end_index"].item()
    local_start = local_end - num_new_tokens
    kv_cache["k"][:, local_start:local_end] = k
    kv_cache["v"][:, local_start:local_end] = v
    keys = kv_cache["k"][:, max(0, local_end - max_attention_size) : local_end]
    values = kv_cache["v"][:, max(0, local_end - max_attention_size) : local_end]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
    kv_cache["global_end_index"].fill_(current_end)
    kv_cache["local_end_index"].fill_(local_end)
    return out.transpose(1, 2)


def plain_cache(capacity: int, dtype) -> dict:
    """What Self-Forcing's ``_initialize_kv_cache`` allocates for one block."""
    return {
        "k": torch.zeros(B, capacity, H, D, dtype=dtype),
        "v": torch.zeros(B, capacity, H, D, dtype=dtype),
        "global_end_index": torch.tensor([0], dtype=torch.long),
        "local_end_index": torch.tensor([0], dtype=torch.long),
    }


def rollout(caches, *, chunks, frames_per_chunk, steps, dtype, seed=0, **attn):
    """Per chunk: ``steps`` denoising calls (noisy q/k/v) and a clean call, over every block."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for c in range(chunks):
        n = frames_per_chunk * FRAME
        start = c * n
        for _ in range(steps + 1):  # the last call is the clean context pass
            q, k, v = (torch.randn(B, n, H, D, generator=gen).to(dtype) for _ in range(3))
            for cache in caches:
                outs.append(causal_attention_step(q, k, v, cache, start, **attn))
    return outs


@pytest.mark.parametrize(
    "attn, sink_chunks",
    [
        ({"local_attn_size": -1, "sink_size": 0, "max_attention_size": 10_000}, 0),  # global attention
        ({"local_attn_size": 9, "sink_size": 0, "max_attention_size": 9 * FRAME}, 0),  # sliding window
        ({"local_attn_size": 12, "sink_size": 3, "max_attention_size": 12 * FRAME}, 1),  # sink + window
        ({"local_attn_size": 12, "sink_size": 3, "max_attention_size": 7 * FRAME}, 1),  # reads a suffix
    ],
)
def test_lossless_drop_in_matches_the_plain_buffers_exactly(attn, sink_chunks):
    capacity = 10_000 if attn["local_attn_size"] == -1 else attn["local_attn_size"] * FRAME
    plain = [plain_cache(capacity, torch.bfloat16) for _ in range(2)]
    cache = qkv.KVCache("bf16", span_chunks=2, sink_chunks=sink_chunks)
    ours = self_forcing_kv_cache(cache, num_blocks=2, batch_size=B, capacity=capacity, heads=H, head_dim=D,
                                 dtype=torch.bfloat16, device="cpu")
    run = dict(chunks=10, frames_per_chunk=3, steps=2, dtype=torch.bfloat16, **attn)
    expected = rollout(plain, **run)
    got = rollout(ours, **run)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    for p, o in zip(plain, ours):
        assert o["local_end_index"].item() == p["local_end_index"].item()
        end = p["local_end_index"].item()
        assert torch.equal(o["k"][:, :end], p["k"][:, :end])
    layer = cache.layer(0)
    assert layer.spans and layer.seen == 9 * 3 * FRAME  # 9 chunks committed, the 10th pending
    if attn["local_attn_size"] != -1:
        assert layer.tokens <= capacity and layer.evicted > 0


def test_compressed_drop_in_stays_close_and_smaller():
    attn = {"local_attn_size": 12, "sink_size": 3, "max_attention_size": 12 * FRAME}
    plain = [plain_cache(12 * FRAME, torch.float32)]
    cache = qkv.KVCache(qkv.build_policy("qvg", bits=8, clusters=8, block=32), span_chunks=2, sink_chunks=1)
    ours = self_forcing_kv_cache(cache, num_blocks=1, batch_size=B, capacity=12 * FRAME, heads=H, head_dim=D,
                                 dtype=torch.float32, device="cpu")
    run = dict(chunks=8, frames_per_chunk=3, steps=1, dtype=torch.float32, **attn)
    expected, got = rollout(plain, **run), rollout(ours, **run)
    errors = [float((g - e).norm() / e.norm()) for e, g in zip(expected, got)]
    assert errors[0] == 0 and 0 < max(errors) < 0.02  # the first chunk has no compressed history
    assert cache.memory().compressed > 0 and cache.memory().total < 2 * 12 * FRAME * H * D * 4


def test_unsupported_writes_raise():
    cache = qkv.KVCache("bf16", span_chunks=2)
    (block,) = self_forcing_kv_cache(cache, num_blocks=1, batch_size=B, capacity=64, heads=H, head_dim=D,
                                     dtype=torch.bfloat16, device="cpu")
    x = torch.zeros(B, 6, H, D, dtype=torch.bfloat16)
    block["k"][:, 0:6] = x
    block["v"][:, 0:6] = x
    block["global_end_index"].fill_(6)
    with pytest.raises(CacheError, match="neither the next chunk"):
        block["k"][:, 10:16] = x  # leaves a gap
    with pytest.raises(ShapeError, match="shape"):
        block["k"][:, 6:12] = x[:, :5]
    with pytest.raises(CacheError, match="only 6 hold data"):
        block["k"][:, 0:12]
    with pytest.raises(CacheError, match=r"\[:, start:end\]"):
        block["k"][0]
    block["k"][:, 6:12] = x + 1
    block["v"][:, 6:12] = x + 1
    with pytest.raises(CacheError, match="not the history shifted"):
        block["k"][:, 0:6] = x + 2  # looks like a shift, but the data is not the shifted history
    with pytest.raises(CacheError, match="compressed store"):
        block["k"] = x
    with pytest.raises(NonFiniteError, match="NaN"):
        block["k"][:, 12:18] = x.index_fill(1, torch.tensor([2]), float("nan"))
    assert block.filled == 12 and cache.layer(0).tokens == 6  # nothing stored by the failed writes
