"""qkv.adapters.sana_wm against diffusers' own SANA-WM refiner: ``SanaWMLTX2Refiner.__call__``
(pipelines/sana_wm/refiner.py) runs unchanged on a tiny ``SanaWMLTX2RefinerTransformer3DModel``
with random weights; only its prompt encoding (a Gemma-3 text encoder) is replaced by fixed random
embeddings, and there is no VAE (``output_type="latent"``)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError, NonFiniteError

refiner = pytest.importorskip("diffusers.pipelines.sana_wm.refiner", reason="needs diffusers >= 0.42 (SANA-WM)")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2RefinerTransformer3DModel  # noqa: E402

from qkv.caches.adapters import sana_wm as adapter  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

FRAMES, TOKENS = 17, 16  # 1 sink frame + 16 refined frames (blocks of 3), 4 x 4 tokens per frame
WINDOW = 7  # kv_max_frames: sink + 6 history frames, so the history is cut inside a block


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    transformer = SanaWMLTX2RefinerTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
        num_layers=2, caption_channels=16, audio_in_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=16, audio_cross_attention_dim=32,
    ).eval()
    p = refiner.SanaWMLTX2Refiner(transformer=transformer, connectors=None, tokenizer=None, text_encoder=None,
                                  scheduler=FlowMatchEulerDiscreteScheduler(), vae=None)
    p.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    embeds, mask = torch.randn(1, 6, 16, generator=gen), torch.ones(1, 6, dtype=torch.long)
    p._encode_prompt = lambda prompt, device, dtype: (embeds.to(dtype), mask)  # instead of Gemma-3
    p.stage1 = torch.randn(1, 8, FRAMES, 4, 4, generator=gen)
    return p


def refine(pipe):
    return pipe(pipe.stage1, "a prompt", fps=24.0, generator=torch.Generator().manual_seed(0),
                kv_max_frames=WINDOW, output_type="latent")


@pytest.fixture(scope="module")
def reference(pipe):
    return refine(pipe)


@pytest.fixture
def no_history_read(monkeypatch):
    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)


@pytest.mark.parametrize("sink_full_precision", [True, False])
def test_lossless_refinement_matches_the_upstream_cache(pipe, reference, no_history_read, sink_full_precision):
    with adapter.install(pipe, "fp32", sink_full_precision=sink_full_precision) as handle:
        ours = refine(pipe)
        layer = handle.cache.layer(0)
        # the pipeline's cut after the last block's capture left the cache at once: its 6 frames,
        # as upstream's history (3 spans: a block per span, the oldest partly evicted)
        assert layer.tokens == (WINDOW - 1) * TOKENS and layer.evicted == (FRAMES - WINDOW) * TOKENS
        assert len(layer.spans) == 3
    # fp32 rounding only: the attention is summed per segment (log-sum-exp merge) instead of at once
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert all(type(b.attn1.processor).__name__ == "SanaWMLTX2RefinerAttnProcessor"
               for b in pipe.transformer.transformer_blocks)


def test_the_guard_catches_a_path_that_reads_the_history(pipe, no_history_read):
    with adapter.install(pipe, "fp32", attention="read"):
        with pytest.raises(AssertionError, match="decompressed the whole history"):
            refine(pipe)


def test_qvg_stays_close_and_stores_less(pipe, reference, bounded_spans):
    with adapter.install(pipe, qkv.build_policy("qvg", clusters=4, block=16)) as handle:
        ours = refine(pipe)
        mem = handle.memory()
    assert bounded_spans  # every compressed span within its guaranteed error bound
    drift = float((ours - reference)[:, :, 1:].norm() / reference[:, :, 1:].norm())
    assert 0 < drift < 0.02  # measured 3.3e-3 (4 clusters, blocks of 16)
    assert mem.full_precision == 0 and mem.bits_per_element < 6  # of 32: spans and sinks all compressed
    # what upstream holds at the end, per layer: the sink frame and the 6-frame history, nothing dead
    layers = len(pipe.transformer.transformer_blocks)
    assert mem.tokens == layers * WINDOW * TOKENS and mem.dead_tokens == 0


def test_captured_blocks_are_compressed_in_passes(pipe, compress_passes):
    """A refined block's K/V, and a captured sink, wait until ``blocks_per_pass`` blocks (or the
    last block) captured theirs, then are compressed in one pass; the refinement equals
    block-by-block passes bit for bit."""
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    passes = compress_passes
    runs = {}
    for per_pass in (1, 2):
        passes.clear()
        with adapter.install(pipe, policy, blocks_per_pass=per_pass) as handle:
            runs[per_pass] = refine(pipe), list(passes), handle.memory()
    blocks = -(-(FRAMES - 1) // 3)  # refined blocks of 3 frames (the last one shorter)
    assert runs[2][1] == [2] + [2] * blocks  # both layers' sinks in one pass, then both layers' block
    assert runs[1][1] == [1, 1] + [1, 1] * blocks
    assert torch.equal(runs[1][0], runs[2][0]) and runs[1][2] == runs[2][2]
    with pytest.raises(ConfigError, match="blocks_per_pass"):
        adapter.install(pipe, policy, blocks_per_pass=0)


def test_a_bad_sink_value_names_its_block(pipe, monkeypatch):
    set_sink = adapter.SanaWMHandle.set_sink

    def poisoned(self, index, k, v):
        set_sink(self, index, k.clone().index_fill_(2, torch.tensor([1]), float("nan")) if index == 1 else k, v)

    monkeypatch.setattr(adapter.SanaWMHandle, "set_sink", poisoned)
    with adapter.install(pipe, qkv.build_policy("qvg", clusters=4, block=16)):
        with pytest.raises(NonFiniteError, match="sana_wm block 1: sink: k"):
            refine(pipe)


def test_a_history_the_cache_does_not_hold_raises(pipe):
    transformer = pipe.transformer
    with pytest.raises(ConfigError, match="max_spans, sink_chunks"):  # the pipeline's window decides
        adapter.install(pipe, "fp32", sink_chunks=1, max_spans=2)
    with adapter.install(transformer, "fp32"):
        cache = refiner.SanaWMRefinerKVCache(len(transformer.transformer_blocks))
        for i in range(len(cache)):
            cache.get(i).store_history(torch.empty(1, TOKENS, 0), torch.empty(1, TOKENS, 0))
        rope = transformer.build_rotary_emb_for_absolute_positions(batch_size=1, frame_positions=[1], height=4,
                                                                   width=4, device="cpu", fps=24.0)
        with pytest.raises(CacheError, match="history has 16 tokens"), torch.no_grad():
            transformer(hidden_states=torch.randn(1, TOKENS, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                        timestep=torch.zeros(1, TOKENS), video_rotary_emb=rope, kv_cache=cache, kv_cache_mode="inject")


def test_context_parallelism_is_refused(pipe, monkeypatch):
    """diffusers has no context-parallel plan for the refiner; one given by hand is refused at
    install and at the first cached forward (enable_parallelism after install)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    with adapter.install(pipe, "fp32"):
        monkeypatch.setattr(pipe.transformer, "_parallel_config",
                            ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)))
        with pytest.raises(ConfigError, match="no context-parallel plan"):
            refine(pipe)
        with pytest.raises(ConfigError, match="no context-parallel plan"):
            adapter.install(pipe, "fp32")
