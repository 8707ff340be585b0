"""qkv.adapters.streamdiffusionv2 against the upstream code itself: streamdiffusionv2's
``CausalWanModel`` (models/wan/causal_model.py), a tiny config, random weights.

``rollout`` restates the loop of ``CausalStreamInferencePipeline.inference_wo_batch``
(models/wan/causal_stream_inference.py): per chunk, one model call per denoising step at the same
``current_start``, the prediction re-noised for the next step, the last step at t = 0; the
pipeline itself needs the Wan text encoder and VAE weights, so only its loop is restated.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import qkv
from qkv.caches.kvcache import LayerCache
from qkv.errors import CacheError, ConfigError

causal_model = pytest.importorskip(
    "models.wan.causal_model", reason="needs streamdiffusionv2 (pip install --no-deps streamdiffusionv2==0.1.1 ftfy)"
)
from qkv.caches.adapters import streamdiffusionv2 as adapter  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

C, F, H, W = 4, 2, 8, 8  # latent chunk: 2 frames of 4 x 4 patches
N = F * (H // 2) * (W // 2)  # 32 tokens per chunk
HEADS, HEAD_DIM, TEXT = 2, 32, 8
TIMESTEPS = (700, 300, 0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = causal_model.CausalWanModel(dim=HEADS * HEAD_DIM, ffn_dim=128, freq_dim=32, text_dim=32, num_heads=HEADS,
                                    num_layers=2, in_dim=C, out_dim=C, text_len=TEXT).eval()
    torch.nn.init.normal_(m.head.head.weight, std=0.02)  # upstream zero-initialises the output head
    return m


def kv_dicts(model, capacity, batch=1):
    """What ``_initialize_kv_cache`` / ``_initialize_crossattn_cache`` allocate (fp32 here)."""
    kv = [{"k": torch.zeros(batch, capacity, HEADS, HEAD_DIM), "v": torch.zeros(batch, capacity, HEADS, HEAD_DIM),
           "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0]),
           "total_steps": len(TIMESTEPS), "current_step": len(TIMESTEPS)} for _ in model.blocks]
    cross = [{"k": None, "v": None, "is_init": False} for _ in model.blocks]
    return kv, cross


def rollout(model, chunks, capacity, batch=1, kv=None, starts=None):
    """Outputs [B, C, F, H, W] of every call (chunks x denoising steps), fp32."""
    gen = torch.Generator().manual_seed(1)
    context = [torch.randn(TEXT, 32, generator=gen) for _ in range(batch)]
    kv, cross = kv if kv is not None else kv_dicts(model, capacity, batch)
    outs = []
    for c in range(chunks):
        x = torch.randn(batch, C, F, H, W, generator=gen)
        start = torch.full((batch,), c * N) if starts is None else starts(c)
        for t in TIMESTEPS:
            with torch.no_grad():
                out = model(list(x), torch.full((batch, F), t), context, seq_len=10**6, kv_cache=kv,
                            crossattn_cache=cross, current_start=start, current_end=start + N)
            outs.append(out)
            x = 0.6 * out + 0.4 * torch.randn(out.shape, generator=gen)
    return outs


@pytest.fixture
def no_history_read(monkeypatch):
    """Fails the test if anything decompresses a layer's whole history (``LayerCache.read``)."""

    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)


def test_lossless_rollout_matches_the_upstream_cache(model, no_history_read):
    ref = rollout(model, 5, capacity=8 * N)
    with adapter.install(model, "fp32", span_chunks=2) as handle:
        ours = rollout(model, 5, capacity=8 * N)
        layer = handle.cache.layer(0)
        assert len(layer.spans) == 2 and layer.tokens == 4 * N  # chunk 4 is the one being denoised
        assert handle.memory().tokens == 2 * 5 * N  # 2 blocks, 5 chunks held
    # fp32 rounding only: the attention is summed span by span (log-sum-exp merge) instead of at once
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert "forward" not in vars(model.blocks[0].self_attn)  # removed: upstream's own forward again
    assert all(torch.equal(a, b) for a, b in zip(ref, rollout(model, 5, capacity=8 * N)))


def test_the_guard_catches_a_path_that_reads_the_history(model, no_history_read):
    with adapter.install(model, "fp32", span_chunks=2, attention="read"):
        with pytest.raises(AssertionError, match="decompressed the whole history"):
            rollout(model, 3, capacity=8 * N)


def test_qvg_spans_hold_their_bounds_and_the_output_stays_close(model, bounded_spans):
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    ref = rollout(model, 6, capacity=8 * N)
    with adapter.install(model, policy, span_chunks=2) as handle:
        ours = rollout(model, 6, capacity=8 * N)
        assert handle.memory().bits_per_element < 16
    assert len(bounded_spans) == 2 * 2  # two spans in each of the two blocks, each within its bound
    drift = [float((b - a).norm() / a.norm()) for a, b in zip(ref, ours)]
    assert max(drift[: 2 * 3]) <= 1e-5  # chunks 0-1 see no compressed span (chunks 0-1 form the first)
    assert 0 < max(drift) < 0.15  # measured 0.032 (4 clusters, blocks of 16, 64-token spans)


def test_the_upstream_ring_buffer_and_stream_batching_raise(model):
    with adapter.install(model, "fp32", span_chunks=2):
        with pytest.raises(CacheError, match="capacity"):
            rollout(model, 3, capacity=3 * N)  # chunk 2 fills the buffer: its second step would ring
        with pytest.raises(CacheError, match="stream batching"):
            rollout(model, 1, capacity=8 * N, batch=2, starts=lambda c: torch.tensor([N * c, N * c + N]))
        with pytest.raises(CacheError, match="expected 32"):
            rollout(model, 2, capacity=8 * N, starts=lambda c: torch.tensor([2 * N * c]))
    with pytest.raises(ConfigError, match="max_spans, num_layers"):
        adapter.install(model, "fp32", num_layers=2, max_spans=4)


def test_the_pipeline_allocates_no_kv_buffers(model):
    inference = pytest.importorskip("models.wan.causal_stream_inference")
    pipe = inference.CausalStreamInferencePipeline.__new__(inference.CausalStreamInferencePipeline)
    torch.nn.Module.__init__(pipe)
    pipe.generator = torch.nn.Module()
    pipe.generator.model = model
    pipe.num_transformer_blocks, pipe.num_heads, pipe.num_sink_tokens, pipe.adapt_sink_threshold = 2, HEADS, 1, -1
    pipe.kv_cache_length = 8 * N
    pipe.denoising_step_list = torch.tensor(TIMESTEPS)
    inference.CausalStreamInferencePipeline._initialize_kv_cache(pipe, 1, torch.float32, "cpu")
    upstream = pipe.kv_cache1
    with adapter.install(pipe, "fp32", span_chunks=2):
        pipe._initialize_kv_cache(1, torch.float32, "cpu")
        ours = pipe.kv_cache1
        assert [sorted(d) for d in ours] == [sorted(d) for d in upstream]
        assert all(d["k"].is_meta and d["k"].shape == u["k"].shape for d, u in zip(ours, upstream))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = rollout(model, 3, capacity=None, kv=(ours, kv_dicts(model, 1)[1]))
        assert int(ours[0]["global_end_index"]) == 3 * N and int(ours[0]["local_end_index"]) == 3 * N
    assert "_initialize_kv_cache" not in vars(pipe)
    ref = rollout(model, 3, capacity=8 * N)
    for a, b in zip(ref, out, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
