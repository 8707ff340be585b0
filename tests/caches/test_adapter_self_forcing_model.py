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
