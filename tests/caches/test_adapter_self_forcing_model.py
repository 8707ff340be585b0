"""qkv.adapters.self_forcing on a restatement of Self-Forcing's whole inference path
(upstream_self_forcing.py: its causal Wan model, wrapper, scheduler and CausalInferencePipeline,
on Wan2.1's base modules from streamdiffusionv2): tiny config, random weights, fp32 on the CPU,
chunks of 3 latent frames, 4 denoising steps and the context pass, global attention and a rolling
window with a sink."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("models.wan.wan_base.modules.model",
                    reason="needs streamdiffusionv2 (pip install --no-deps streamdiffusionv2==0.1.1 ftfy)")
import upstream_self_forcing as upstream  # noqa: E402

import qkv  # noqa: E402
from qkv.caches.adapters import self_forcing  # noqa: E402
from qkv.caches.layer_cache import LayerCache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS, HEAD_DIM, BLOCKS, HW, TEXT = 2, 32, 2, 4, 8
FRAME = (HW // 2) ** 2  # tokens per latent frame (patch 1 x 2 x 2)


def pipeline(chunks: int, local_attn_size: int = -1, sink_size: int = 0) -> upstream.CausalInferencePipeline:
    torch.manual_seed(0)
    model = upstream.CausalWanModel(text_len=TEXT, in_dim=4, dim=HEADS * HEAD_DIM, ffn_dim=64, freq_dim=32,
                                    text_dim=16, out_dim=4, num_heads=HEADS, num_layers=BLOCKS,
                                    local_attn_size=local_attn_size, sink_size=sink_size)
    nn = torch.nn
    for m in model.modules():  # upstream zero-initializes the head: random weights everywhere
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.3)
    pipe = upstream.CausalInferencePipeline(upstream.WanDiffusionWrapper(model))
    pipe.num_transformer_blocks, pipe.frame_seq_length = BLOCKS, FRAME
    pipe.KV_HEADS, pipe.KV_HEAD_DIM, pipe.KV_TOKENS, pipe.TEXT_TOKENS = HEADS, HEAD_DIM, 3 * chunks * FRAME, TEXT
    return pipe


def rollout(pipe, chunks: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 3 * chunks, 4, HW, HW, generator=gen)
    prompt = {"prompt_embeds": torch.randn(1, TEXT, 16, generator=gen)}
    torch.manual_seed(2)  # the scheduler's re-noising draws
    pipe.kv_cache1 = None
    with torch.no_grad():
        return pipe.inference(noise, prompt)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def held_after_each_call(pipe, handle, run) -> tuple[torch.Tensor, list]:
    """``run()``'s output, and what the handle held in full precision after each model call."""
    held = []
    hook = pipe.generator.register_forward_hook(lambda *_: held.append(handle.pending()))
    try:
        return run(), held
    finally:
        hook.remove()


@pytest.mark.parametrize("local_attn_size, sink_size", [(-1, 0), (9, 1)])
def test_the_adapter_runs_upstreams_pipeline_on_compressed_spans(local_attn_size, sink_size, monkeypatch):
    """Lossless: upstream's own output (fp32 rounding: attention computed another way); qvg:
    close, and smaller than upstream's buffers; the forward path never decompresses a history."""
    chunks = 6
    pipe = pipeline(chunks, local_attn_size, sink_size)
    reference = rollout(pipe, chunks)

    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)
    with self_forcing.install(pipe, "fp32") as handle:
        lossless = rollout(pipe, chunks)
        layer = handle.caches()[0].layer(0)
        assert layer.spans  # compressed spans were attended to
        assert handle.pending() == []  # the last chunk was stored at its context pass
        if local_attn_size != -1:
            assert layer.evicted > 0
    assert relative(reference, lossless) < 1e-6  # measured 1.6e-7
    with self_forcing.install(pipe, qkv.build_policy("qvg", clusters=4, block=16)) as handle:
        compressed = rollout(pipe, chunks)
        held = handle.memory().total
    upstream_bytes = 2 * BLOCKS * pipe.KV_TOKENS * HEADS * HEAD_DIM * 4
    # 4 clusters, blocks of 16: measured 0.28% (global) and 0.13% (window of 9 frames, 1 sink frame)
    assert 0 < relative(reference, compressed) < 0.01 and held < upstream_bytes / 2
    assert "_initialize_kv_cache" not in vars(pipe)


@pytest.mark.parametrize("local_attn_size, sink_size", [(-1, 0), (9, 1)])
def test_inference_holds_no_chunk_in_full_precision_between_model_calls(local_attn_size, sink_size, compress_passes):
    """In the pipeline's own ``inference`` every chunk gets its denoising steps and the context
    pass: each block's chunk is dropped after every call but the context pass and stored there,
    ``blocks_per_pass`` blocks in one compression pass, so no block holds its chunk in full
    precision between calls; the output is upstream's to fp32 rounding. Called by hand (as
    ``demo.py`` does) the chunk is held until the next one starts, as before."""
    chunks = 4
    pipe = pipeline(chunks, local_attn_size, sink_size)
    reference = rollout(pipe, chunks)
    with self_forcing.install(pipe, "fp32", span_chunks=1, blocks_per_pass=1) as handle:
        ours, held = held_after_each_call(pipe, handle, lambda: rollout(pipe, chunks))
        steps = len(pipe.denoising_step_list) + 1
        assert len(held) == chunks * steps and all(p == [] for p in held)
        # blocks_per_pass=1: one block's chunk per pass (with a sink frame, the spans after it are cut
        # differently from the chunks, hence no fixed count)
        assert set(compress_passes) == {1} and len(compress_passes) >= BLOCKS * (chunks - 1)
        assert handle.writes_per_chunk is None  # only while inference runs
    assert relative(reference, ours) < 1e-6


def test_a_chunk_written_a_number_of_times_the_pipeline_does_not_make_raises():
    """The writes a chunk gets come from the pipeline; a call beyond them raises, and a next
    chunk before them raises, naming the chunk whose K/V were dropped."""
    chunks = 2
    pipe = pipeline(chunks)
    with self_forcing.install(pipe, "fp32"):
        rollout(pipe, 1)
        wrapper, calls = pipe.generator, []
        forward, steps = wrapper.forward, len(pipe.denoising_step_list) + 1

        def twice_the_context_pass(*args, **kwargs):
            calls.append(1)
            out = forward(*args, **kwargs)
            return forward(*args, **kwargs) if len(calls) == steps else out

        wrapper.forward = twice_the_context_pass
        try:
            with pytest.raises(qkv.errors.CacheError, match="written again after the 5 writes"):
                rollout(pipe, 1)
            calls.clear()

            def no_context_pass(*args, **kwargs):
                calls.append(1)
                return None if len(calls) % steps == 0 else forward(*args, **kwargs)

            wrapper.forward = no_context_pass
            with pytest.raises(qkv.errors.CacheError, match="written 4 times, not the 5"):
                rollout(pipe, 2)
        finally:
            del wrapper.forward


def cfg_pipeline(chunks: int, independent_first_frame: bool = False) -> upstream.CausalDiffusionInferencePipeline:
    pipe = pipeline(chunks)  # the same tiny model and wrapper
    cfg = upstream.CausalDiffusionInferencePipeline(pipe.generator, sampling_steps=3,
                                                    independent_first_frame=independent_first_frame)
    cfg.num_transformer_blocks, cfg.frame_seq_length = BLOCKS, FRAME
    cfg.KV_HEADS, cfg.KV_HEAD_DIM, cfg.KV_TOKENS, cfg.TEXT_TOKENS = HEADS, HEAD_DIM, (3 * chunks + 1) * FRAME, TEXT
    return cfg


def cfg_rollout(pipe, frames: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(1, frames, 4, HW, HW, generator=gen)
    prompts = [{"prompt_embeds": torch.randn(1, TEXT, 16, generator=gen)} for _ in range(2)]
    pipe.kv_cache_pos = pipe.kv_cache_neg = None
    with torch.no_grad():
        return pipe.inference(noise, *prompts)


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_the_cfg_pipeline_stores_each_chunk_at_its_last_write(independent_first_frame, compress_passes):
    """``CausalDiffusionInferencePipeline`` (classifier-free guidance: every timestep runs the model
    on both caches, then both take the context pass): in its own ``inference`` each cache's chunk
    is stored at its last write, the scheduler's timesteps + 1, so no block of either cache holds
    its chunk in full precision between model calls; the output is upstream's to fp32 rounding
    (a first chunk of one frame included), and qvg stays close."""
    chunks = 3
    frames = 3 * chunks + independent_first_frame
    pipe = cfg_pipeline(chunks, independent_first_frame)
    reference = cfg_rollout(pipe, frames)
    with self_forcing.install(pipe, "fp32", span_chunks=1, blocks_per_pass=1) as handle:
        ours, held = held_after_each_call(pipe, handle, lambda: cfg_rollout(pipe, frames))
        assert sorted(handle.named) == ["kv_cache_neg", "kv_cache_pos"]
        writes = 2 * (pipe.sampling_steps + 1)  # both caches, the timesteps and the context pass
        assert len(held) == (chunks + independent_first_frame) * writes and all(p == [] for p in held)
        assert set(compress_passes) == {1} and len(compress_passes) >= 2 * BLOCKS * chunks
        assert handle.writes_per_chunk is None  # only while inference runs
        assert all(c.layer(0).spans for c in handle.caches())
    assert relative(reference, ours) < 1e-6
    with self_forcing.install(pipe, qkv.build_policy("qvg", clusters=4, block=16)):
        compressed = cfg_rollout(pipe, frames)
    assert 0 < relative(reference, compressed) < 0.02
