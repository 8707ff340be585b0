"""The Self-Forcing cache drop-in: that code's attention runs unchanged on our per-block dicts.

``causal_attention_step`` re-states the cache handling of Self-Forcing's ``CausalWanSelfAttention``
(inference branch; guandeh17/Self-Forcing, wan/modules/causal_model.py) on [B, L, H, D] tensors:
the same index arithmetic, slice writes, left shift after the sink, slice read and ``fill_`` of the
end indices. ``rollout`` re-states the pipeline's loop: per chunk, several denoising calls that
rewrite the chunk's slots, then a clean call, with ``current_start`` in tokens.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.caches.adapters import self_forcing
from qkv.caches.adapters.self_forcing import cache_options, self_forcing_kv_cache
from qkv.caches.cache_config import CacheMemory
from qkv.errors import CacheError, ConfigError, GradientError, NonFiniteError, ShapeError

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


def plain_cache(capacity: int, dtype, batch: int = B) -> dict:
    """What Self-Forcing's ``_initialize_kv_cache`` allocates for one block."""
    return {
        "k": torch.zeros(batch, capacity, H, D, dtype=dtype),
        "v": torch.zeros(batch, capacity, H, D, dtype=dtype),
        "global_end_index": torch.tensor([0], dtype=torch.long),
        "local_end_index": torch.tensor([0], dtype=torch.long),
    }


def rollout(caches, *, chunks, frames_per_chunk, steps, dtype, seed=0, batch=B, **attn):
    """Per chunk: ``steps`` denoising calls (noisy q/k/v) and a clean call, over every block."""
    gen = torch.Generator().manual_seed(seed)
    outs = []
    for c in range(chunks):
        n = frames_per_chunk * FRAME
        start = c * n
        for _ in range(steps + 1):  # the last call is the clean context pass
            q, k, v = (torch.randn(batch, n, H, D, generator=gen).to(dtype) for _ in range(3))
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
    cache = qkv.KVCache("bf16", span_chunks=2, sink_tokens=sink_chunks * 3 * FRAME)
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
    cache = qkv.KVCache(qkv.build_policy("qvg", bits=8, clusters=8, block=32), span_chunks=2, sink_tokens=3 * FRAME)
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
    assert block.filled == 12 and cache.layer(0).tokens == 6  # nothing stored by the failed writes
    block["k"][:, 12:18] = x.index_fill(1, torch.tensor([2]), float("nan"))  # checked when stored, not per write
    block["v"][:, 12:18] = x
    with pytest.raises(NonFiniteError, match=r"layer 0: k holds 64 NaN/Inf values \(first at index \(0, 0, 2, 0\)\)"):
        block["k"][:, 18:24] = x  # the next chunk stores this one
    assert block.filled == 18 and cache.layer(0).tokens == 12  # the bad chunk stays pending, unstored


def window_caches(attn, *, chunks, batch=B, blocks=2, policy="bf16", dtype=torch.bfloat16, reset_after=None,
                  spans=None):
    """``rollout`` over the plain buffers and over drop-ins made with :func:`cache_options` for the
    same window and sink (``spans``: span options instead of its one-chunk spans); with
    ``reset_after``, the indices are replaced by zeros after that many chunks and a second video
    runs (the pipelines' reset). Returns (plain outputs, ours, cache, blocks)."""
    capacity = attn["local_attn_size"] * FRAME
    options = cache_options(frame_tokens=FRAME, chunk_frames=3, sink_size=attn["sink_size"])
    if spans is not None:
        options = {**{k: x for k, x in options.items() if k != "span_tokens"}, **spans}
    cache = qkv.KVCache(policy, **options)
    ours = self_forcing_kv_cache(cache, num_blocks=blocks, batch_size=batch, capacity=capacity, heads=H, head_dim=D,
                                 dtype=dtype, device="cpu")
    plain = [plain_cache(capacity, dtype, batch) for _ in range(blocks)]
    run = dict(frames_per_chunk=3, steps=2, dtype=dtype, batch=batch, **attn)
    expected, got = [], []
    for video, n in enumerate([chunks] if reset_after is None else [reset_after, chunks]):
        if video:
            for d in (*plain, *ours):
                d["global_end_index"] = torch.tensor([0], dtype=torch.long)
                d["local_end_index"] = torch.tensor([0], dtype=torch.long)
        expected += rollout(plain, chunks=n, seed=video, **run)
        got += rollout(ours, chunks=n, seed=video, **run)
    return expected, got, cache, ours


@pytest.mark.parametrize(
    "attn",
    [
        {"local_attn_size": 10, "sink_size": 1, "max_attention_size": 10 * FRAME},  # first eviction 2 frames
        {"local_attn_size": 13, "sink_size": 1, "max_attention_size": 13 * FRAME},  # sink + 4 chunks
        {"local_attn_size": 9, "sink_size": 0, "max_attention_size": 9 * FRAME},  # a 9-frame window
    ],
)
def test_frame_sinks_and_windows_shorter_than_spans_match_the_plain_buffers(attn):
    """A sink of one frame with chunks of three (``sink_tokens``), windows of a few chunks over 12
    chunks, batch 2, and a second video after a reset: exact with the bf16 policy."""
    expected, got, cache, ours = window_caches(attn, chunks=12, batch=2, reset_after=5)
    assert len(got) == len(expected) and all(torch.equal(e, g) for e, g in zip(expected, got))
    layer = cache.layer(0)
    assert sum(c.tokens for c in layer.sink) == attn["sink_size"] * FRAME
    assert layer.evicted > 0 and layer.memory().dead_tokens == 0 and layer.memory().reserved == 0
    assert ours[0].filled <= attn["local_attn_size"] * FRAME


@pytest.mark.parametrize("sink_size, most", [(0, 0.5), (1, 0.8)])
def test_with_a_window_the_compressed_cache_holds_less_than_the_plain_buffer(sink_size, most):
    """Everything held (spans, sink, the tokens left over, the chunk being written; nothing
    allocated ahead) against the plain buffers of a 9-frame window, at 64 tokens a frame: the
    chunk being written stays in full precision, and with a sink of one frame so do the sink and
    the two frames after it that wait for the next chunk to complete a span."""
    global FRAME
    frame, FRAME = FRAME, 64
    try:
        attn = {"local_attn_size": 9, "sink_size": sink_size, "max_attention_size": 9 * FRAME}
        policy = qkv.build_policy("qvg", clusters=16, bits=4)
        expected, got, cache, ours = window_caches(attn, chunks=8, policy=policy, dtype=torch.float32, blocks=1)
        held = sum((block.memory() for block in ours), CacheMemory())
        plain = 2 * B * 9 * FRAME * H * D * 4  # K and V buffers of one block, fp32
        assert held.allocated == held.total < most * plain  # measured 0.46 / 0.75 (4-bit spans)
        assert held.tokens == 9 * FRAME  # the window, the chunk being written included
        errors = [float((g - e).norm() / e.norm()) for e, g in zip(expected, got)]
        assert max(errors) < 0.15  # measured 0.11: 4 bits on Gaussian noise
    finally:
        FRAME = frame


@pytest.mark.parametrize("spans", [{"span_chunks": 8}, {"span_chunks": 2}, {"span_tokens": 9 * FRAME}])
def test_spans_that_cannot_complete_in_the_window_raise(spans):
    """Spans longer than upstream's buffer after the sink (a 9-frame window holds 3 chunks; the
    one-frame sink leaves 8 frames, fewer than two chunks) would never be compressed, the window
    held in full precision: the first chunk stored raises instead."""
    attn = {"local_attn_size": 9, "sink_size": 1, "max_attention_size": 9 * FRAME}
    if spans == {"span_chunks": 2}:  # 6 frames fit in 8: it compresses
        expected, got, cache, ours = window_caches(attn, chunks=6, spans=spans)
        assert all(torch.equal(e, g) for e, g in zip(expected, got)) and cache.layer(0).spans
        return
    with pytest.raises(ConfigError, match="never completes"):
        window_caches(attn, chunks=3, spans=spans)


@pytest.mark.parametrize("sink_size", [0, 1])
def test_kivi_in_a_window_compresses_and_allocates_less_than_the_plain_buffer(sink_size):
    """KIVI's residual window inside Self-Forcing's rolling window (9 frames of 1,560 tokens):
    the groups that leave its 128 full-precision tokens are compressed at every chunk, and the
    tail buffer is planned for that window, a group and a chunk, not for a span ahead."""
    global FRAME
    frame, FRAME = FRAME, 1560
    try:
        attn = {"local_attn_size": 9, "sink_size": sink_size, "max_attention_size": 9 * FRAME}
        expected, got, cache, ours = window_caches(attn, chunks=5, batch=1, blocks=1, policy="kivi")
        held = ours[0].memory()
        plain = 2 * 9 * FRAME * H * D * 2  # K and V buffers of one block, bf16
        assert held.compressed > 0 and held.allocated < 0.95 * plain  # measured 0.81 / 0.90
        assert ours[0].layer.buffer.capacity <= 128 + 32 + 3 * FRAME
        errors = [float((g.float() - e.float()).norm() / e.float().norm()) for e, g in zip(expected, got)]
        assert max(errors) < 0.6  # 2-bit KIVI on Gaussian noise
    finally:
        FRAME = frame


def test_gradients_flow_through_the_chunk_being_written_and_are_never_dropped():
    """Self-Forcing's training rollout: the exit step runs with grad (its chunk's slots are read
    back differentiably), the clean context pass rewrites them under no_grad; the gradient equals
    the plain buffers'. A chunk still requiring grad when the next one starts raises."""
    attn = {"local_attn_size": -1, "sink_size": 0, "max_attention_size": 10_000}
    grads = []
    for caches in ([plain_cache(10_000, torch.float32)],
                   self_forcing_kv_cache(qkv.KVCache("fp32", span_chunks=1), num_blocks=1, batch_size=B,
                                         capacity=10_000, heads=H, head_dim=D, dtype=torch.float32, device="cpu")):
        gen = torch.Generator().manual_seed(0)
        w = torch.ones(1, requires_grad=True)
        for c in range(3):  # the gradient is taken at the last chunk's exit step, as upstream's last frames
            q, k, v = (torch.randn(B, 3 * FRAME, H, D, generator=gen) for _ in range(3))
            with torch.set_grad_enabled(c == 2):
                out = causal_attention_step(q, k * w, v * w, caches[0], c * 3 * FRAME, **attn)
            if c == 2:
                (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            with torch.no_grad():
                causal_attention_step(q, k, v, caches[0], c * 3 * FRAME, **attn)
        grads.append(w.grad.clone())
    assert grads[0].abs() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5)
    (block,) = self_forcing_kv_cache(qkv.KVCache("fp32", span_chunks=1), num_blocks=1, batch_size=B, capacity=64,
                                     heads=H, head_dim=D, dtype=torch.float32, device="cpu")
    x = torch.randn(B, 6, H, D, requires_grad=True)
    block["k"][:, 0:6], block["v"][:, 0:6] = x, x
    block["global_end_index"].fill_(6)
    with pytest.raises(GradientError, match="requires grad"):
        block["k"][:, 6:12] = x.detach()
    assert block.layer.tokens == 0


class Pipeline(torch.nn.Module):
    """The three Self-Forcing pipelines' ``_initialize_kv_cache``, restated: ``causal`` and
    ``training`` make ``kv_cache1`` (window or 32760 tokens / ``num_max_frames`` frames), ``cfg``
    (``CausalDiffusionInferencePipeline``) makes ``kv_cache_pos`` and ``kv_cache_neg``; 12 x 128
    and 30 blocks hard-coded there, as upstream."""

    def __init__(self, kind, model):
        super().__init__()
        self.kind, self.generator = kind, types.SimpleNamespace(model=model)
        self.num_transformer_blocks, self.frame_seq_length, self.num_frame_per_block = 30, FRAME, 3
        self.local_attn_size = model.blocks[0].self_attn.local_attn_size

    def _initialize_kv_cache(self, batch_size, dtype, device):
        if self.kind == "training":
            size = 21 * self.frame_seq_length
        else:
            size = self.local_attn_size * self.frame_seq_length if self.local_attn_size != -1 else 32760

        def block():
            return {"k": torch.zeros([batch_size, size, 12, 128], dtype=dtype, device=device),
                    "v": torch.zeros([batch_size, size, 12, 128], dtype=dtype, device=device),
                    "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                    "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}

        names = ("kv_cache_pos", "kv_cache_neg") if self.kind == "cfg" else ("kv_cache1",)
        for name in names:
            setattr(self, name, [block() for _ in range(self.num_transformer_blocks)])


def tiny_model(local_attn_size, sink_size):
    attn = types.SimpleNamespace(local_attn_size=local_attn_size, sink_size=sink_size)
    return types.SimpleNamespace(blocks=[types.SimpleNamespace(self_attn=attn)] * 2, num_heads=H, dim=H * D)


@pytest.mark.parametrize("kind, local_attn_size", [("causal", 9), ("causal", -1), ("cfg", 10), ("training", -1)])
def test_install_covers_every_pipeline_with_shapes_from_the_model(kind, local_attn_size):
    attn = {"local_attn_size": local_attn_size, "sink_size": 1,
            "max_attention_size": 32760 if local_attn_size == -1 else local_attn_size * FRAME}
    pipe = Pipeline(kind, tiny_model(local_attn_size, 1))
    with self_forcing.install(pipe, "bf16") as handle:
        for _ in range(2):  # demo.py initialises again before every video
            pipe._initialize_kv_cache(batch_size=2, dtype=torch.bfloat16, device="cpu")
            lists = [pipe.kv_cache_pos, pipe.kv_cache_neg] if kind == "cfg" else [pipe.kv_cache1]
            assert all(len(blocks) == 2 and blocks[0]["k"].shape[2:] == (H, D) for blocks in lists)
            run = dict(chunks=5, frames_per_chunk=3, steps=1, dtype=torch.bfloat16, batch=2, **attn)
            for blocks in lists:
                plain = [plain_cache(blocks[0]["k"].shape[1], torch.bfloat16, 2) for _ in blocks]
                assert all(torch.equal(a, b) for a, b in zip(rollout(plain, **run), rollout(blocks, **run)))
        assert len(handle.caches()) == len(lists)
        assert handle.caches()[0].config.sink_tokens == FRAME
        assert handle.caches()[0].config.span_tokens == 3 * FRAME  # a span per chunk, with a window or without
        assert handle.memory().tokens == len(lists) * 2 * blocks[0].filled
    assert "_initialize_kv_cache" not in vars(pipe)


def causal_rope_apply(x, grid_sizes, freqs, start_frame=0):
    """Self-Forcing's ``causal_rope_apply`` (RoPE over frames, rows and columns, frames counted from
    ``start_frame``), restated: [B, S, H, D] -> the same."""
    c = x.shape[3] // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    out = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        n = f * h * w
        rotation = torch.cat([parts[0][start_frame : start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                              parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                              parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(n, 1, -1)
        rotated = torch.view_as_real(torch.view_as_complex(x[i, :n].double().reshape(n, x.shape[2], -1, 2)) * rotation)
        out.append(torch.cat([rotated.flatten(2), x[i, n:]]))
    return torch.stack(out).type_as(x)


def rope_frequencies(head_dim: int, positions: int = 64) -> torch.Tensor:
    """Wan's RoPE table (``rope_params`` for the frame, row and column parts), complex [positions, D / 2]."""
    def params(dim):
        angles = torch.outer(torch.arange(positions), 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim))
        return torch.polar(torch.ones_like(angles), angles)

    return torch.cat([params(head_dim - 4 * (head_dim // 6)), params(2 * (head_dim // 6)), params(2 * (head_dim // 6))], 1)


class CausalWanSelfAttention(torch.nn.Module):
    """Self-Forcing's ``CausalWanSelfAttention`` (wan/modules/causal_model.py), restated: its
    projections, RMS norms, ``causal_rope_apply`` and cache branch (``causal_attention_step``);
    ``max_attention_size`` with this test's tokens per frame where upstream has 1,560."""

    def __init__(self, local_attn_size=-1, sink_size=0):
        super().__init__()
        self.num_heads, self.head_dim = H, D
        self.local_attn_size, self.sink_size = local_attn_size, sink_size
        self.max_attention_size = 32760 if local_attn_size == -1 else local_attn_size * FRAME
        self.q, self.k, self.v, self.o = (torch.nn.Linear(H * D, H * D) for _ in range(4))
        self.norm_q, self.norm_k = torch.nn.RMSNorm(H * D, eps=1e-6), torch.nn.RMSNorm(H * D, eps=1e-6)

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None):
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        frame = math.prod(grid_sizes[0][1:]).item()
        roped_q = causal_rope_apply(q, grid_sizes, freqs, start_frame=current_start // frame).type_as(v)
        roped_k = causal_rope_apply(k, grid_sizes, freqs, start_frame=current_start // frame).type_as(v)
        out = causal_attention_step(roped_q, roped_k, v, kv_cache, current_start, local_attn_size=self.local_attn_size,
                                    sink_size=self.sink_size, max_attention_size=self.max_attention_size)
        return self.o(out.flatten(2))


def attention_rollout(pipe, chunks=8, steps=2):
    """The pipeline's loop over the blocks' self-attention: per chunk (3 frames of 2 x 3 tokens),
    ``steps`` denoising calls and the clean call, ``current_start`` in tokens."""
    gen = torch.Generator().manual_seed(2)
    blocks, freqs = pipe.generator.model.blocks, rope_frequencies(D)
    grid = torch.tensor([[3, 2, 3]])
    outs = []
    for c in range(chunks):
        for _ in range(steps + 1):
            x = torch.randn(B, 3 * FRAME, H * D, generator=gen)
            for block, cache in zip(blocks, pipe.kv_cache1):
                with torch.no_grad():
                    outs.append(block.self_attn(x, None, grid, freqs, None, kv_cache=cache, current_start=c * 3 * FRAME))
    return outs


@pytest.mark.parametrize("local_attn_size, sink_size, suffix", [(-1, 0, False), (9, 0, False), (12, 1, False),
                                                                (12, 1, True)])
def test_the_attention_runs_on_the_compressed_spans(monkeypatch, local_attn_size, sink_size, suffix):
    """With ``install``, upstream's self-attention attends to the compressed spans and the chunk
    being written (no slot read decompresses the history), matching the plain buffers within fp32
    rounding (the segments are merged by log-sum-exp), windows and sinks included; the end indices
    are read from their tensors once per video, not at every call. An attention window shorter
    than the buffer (``suffix``: not how upstream sizes it) reads its slots instead."""
    torch.manual_seed(0)
    model = types.SimpleNamespace(blocks=[types.SimpleNamespace(self_attn=CausalWanSelfAttention(local_attn_size, sink_size))
                                          for _ in range(2)], num_heads=H, dim=H * D)
    for block in model.blocks:
        block.self_attn.max_attention_size = 7 * FRAME if suffix else block.self_attn.max_attention_size
    pipe = Pipeline("causal", model)
    capacity = 32760 if local_attn_size == -1 else local_attn_size * FRAME  # as _initialize_kv_cache sizes it
    pipe.kv_cache1 = [plain_cache(capacity, torch.float32) for _ in model.blocks]  # upstream's, at this H x D
    expected = attention_rollout(pipe)
    reads, item = [], torch.Tensor.item
    with self_forcing.install(pipe, "fp32", span_chunks=1) as handle:
        pipe._initialize_kv_cache(batch_size=B, dtype=torch.float32, device="cpu")

        def guarded_read(self):
            raise AssertionError("the forward path decompressed the whole history")

        if not suffix:
            monkeypatch.setattr(qkv.caches.layer_cache.LayerCache, "read", guarded_read)
        monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or item(t))
        got = attention_rollout(pipe)
        monkeypatch.undo()
        layer = handle.caches()[0].layer(0)
        assert layer.spans and (local_attn_size == -1 or layer.evicted > 0)
    assert len(reads) == 2 * 2 + 3 * 8 * 2  # two indices per block once; the frame size per call (upstream's)
    for e, g in zip(expected, got, strict=True):
        assert (e - g).abs().max() <= 1e-5 * e.abs().max()
    assert all("forward" not in vars(b.self_attn) for b in model.blocks)


def test_every_blocks_finished_chunk_is_compressed_in_one_pass(monkeypatch, compress_passes):
    """The first block to start a chunk compresses every block's finished chunk in one pass, and
    checks their values with one read-back; the attention outputs equal block-by-block
    compression bit for bit."""
    torch.manual_seed(0)
    model = types.SimpleNamespace(blocks=[types.SimpleNamespace(self_attn=CausalWanSelfAttention(9, 0))
                                          for _ in range(2)], num_heads=H, dim=H * D)
    pipe = Pipeline("causal", model)
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    passes = compress_passes
    checks, check = [], qkv.caches.kvcache.check_kv_values_later

    def counting_checks(*args):
        checks.append(len(args))
        return check(*args)

    runs = []
    for one_pass in (False, True):
        with monkeypatch.context() as m, self_forcing.install(pipe, policy) as handle:
            m.setattr(qkv.caches.kvcache, "check_kv_values_later", counting_checks)  # compress_ahead's
            m.setattr(qkv.caches.checks, "check_kv_values_later", counting_checks)  # an append's
            m.setattr(qkv.caches.layer_state, "check_kv_values", counting_checks)
            if not one_pass:
                m.setattr(self_forcing.SelfForcingBlockCache, "_compress_finished", lambda self: None)
            passes.clear()
            checks.clear()
            pipe._initialize_kv_cache(batch_size=B, dtype=torch.float32, device="cpu")
            runs.append((attention_rollout(pipe), list(passes), handle.memory()))
            if not one_pass:
                assert len(checks) == 14
    assert runs[1][1] == [2] * 7 and runs[0][1] == [1] * 14  # 8 chunks, 7 committed
    # the values: one check (one read-back) per chunk for both blocks' K and V, not one per write
    # (3 steps x 2 blocks x k, v); block by block, one per block's chunk
    assert len(checks) == 7
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0], strict=True)) and runs[0][2] == runs[1][2]


def test_gradients_through_installs_patched_attention_equal_the_plain_buffers():
    """The training pipeline's grad-enabled exit step through ``install`` (the patched
    ``CausalWanSelfAttention.forward``): the key projection's gradient equals the plain buffers'
    on a lossless policy, and is kept with ``qvg`` (the chunk being written is full precision)."""

    def make():
        torch.manual_seed(0)
        blocks = [types.SimpleNamespace(self_attn=CausalWanSelfAttention(-1, 0)) for _ in range(2)]
        return Pipeline("training", types.SimpleNamespace(blocks=blocks, num_heads=H, dim=H * D))

    def run(pipe):
        freqs, grid, gen = rope_frequencies(D), torch.tensor([[3, 2, 3]]), torch.Generator().manual_seed(1)
        for c in range(3):
            x = torch.randn(B, 3 * FRAME, H * D, generator=gen)
            for grad in ([True, False] if c == 2 else [False]):  # the exit step, then the clean pass
                with torch.set_grad_enabled(grad):
                    h = x
                    for block, cache in zip(pipe.generator.model.blocks, pipe.kv_cache1):
                        h = block.self_attn(h, None, grid, freqs, None, kv_cache=cache, current_start=c * 3 * FRAME)
                    if grad:
                        (h * torch.linspace(-1, 1, h.numel()).view_as(h)).sum().backward()
        return [b.self_attn.k.weight.grad for b in pipe.generator.model.blocks]

    plain = make()
    plain.kv_cache1 = [plain_cache(21 * FRAME, torch.float32) for _ in range(2)]
    expected = run(plain)
    for policy in ("fp32", qkv.build_policy("qvg", clusters=4, block=16)):
        pipe = make()
        with self_forcing.install(pipe, policy):
            pipe._initialize_kv_cache(batch_size=B, dtype=torch.float32, device="cpu")
            got = run(pipe)
        assert all(g is not None and g.norm() > 0 for g in got)
        if policy == "fp32":
            assert all(torch.allclose(g, e, rtol=1e-5, atol=1e-7) for g, e in zip(got, expected))


@pytest.mark.parametrize("sink_size", [0, 1])
def test_a_one_frame_first_chunk_then_three_in_a_window_matches_the_plain_buffers(sink_size):
    """Self-Forcing's 1-then-3-frame schedule (the first chunk one frame, every later chunk three)
    in a 9-frame window, with and without a one-frame sink, over 10 chunks: exact on the fp32
    policy, and nothing is stored as dead tokens (the window's evictions fall on span bounds)."""
    attn = {"local_attn_size": 9, "sink_size": sink_size, "max_attention_size": 9 * FRAME}
    capacity = 9 * FRAME
    cache = qkv.KVCache("fp32", **cache_options(frame_tokens=FRAME, chunk_frames=3, sink_size=sink_size))
    ours = self_forcing_kv_cache(cache, num_blocks=1, batch_size=B, capacity=capacity, heads=H, head_dim=D,
                                 dtype=torch.float32, device="cpu")
    plain = [plain_cache(capacity, torch.float32)]
    outs = {"plain": [], "ours": []}
    for name, caches in (("plain", plain), ("ours", ours)):
        gen, start = torch.Generator().manual_seed(0), 0
        for frames in [1] + [3] * 9:
            n = frames * FRAME
            for _ in range(2):  # a denoising step, then the clean pass
                q, k, v = (torch.randn(B, n, H, D, generator=gen) for _ in range(3))
                outs[name].append(causal_attention_step(q, k, v, caches[0], start, **attn))
            start += n
    assert all(torch.equal(a, b) for a, b in zip(outs["plain"], outs["ours"]))
    layer = cache.layer(0)
    assert layer.evicted > 0 and layer.memory().dead_tokens == 0 and ours[0].filled <= capacity
