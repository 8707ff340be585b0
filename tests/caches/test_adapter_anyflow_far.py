"""qkv.adapters.anyflow_far against diffusers' own AnyFlowFARTransformer3DModel (tiny config,
random weights, its flex-attention prefill on the CPU).

``rollout`` restates the loop of ``AnyFlowFARPipeline.__call__`` and ``encode_kv_cache``
(diffusers/pipelines/anyflow/pipeline_anyflow_far.py) without the text encoder, VAE and scheduler:
per chunk, the denoising steps read the cache (a plain Euler update stands in for the flow-map
scheduler), then the cache-prefill step re-encodes the whole clean context; the upstream cache is
allocated as ``__call__`` does.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import qkv
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError

far = pytest.importorskip("diffusers.models.transformers.transformer_anyflow_far",
                          reason="needs diffusers >= 0.42 (AnyFlow-FAR)")
from qkv.caches.adapters import anyflow_far as adapter  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

PART = (1, 2, 2, 2, 2, 2)  # frames per chunk
B, C, H, W, HEADS, HEAD_DIM, LIMIT = 1, 4, 8, 8, 2, 32, 3
FULL, COARSE = (H // 2) * (W // 2), (H // 4) * (W // 4)  # tokens per frame: patch 2x2, coarse patch 4x4
STEPS = (900, 500, 200)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return far.AnyFlowFARTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=C, text_dim=32,
        freq_dim=32, ffn_dim=128, num_layers=2, full_chunk_limit=LIMIT, rope_max_seq_len=64, chunk_partition=PART,
    ).eval()


def upstream_cache(model):
    """The per-block cache ``AnyFlowFARPipeline.__call__`` allocates."""
    return {i: {"full_cache": torch.zeros(2, B, HEADS, LIMIT * max(PART) * FULL, HEAD_DIM),
                "compressed_cache": torch.zeros(2, B, HEADS, (len(PART) - LIMIT + 1) * max(PART) * COARSE, HEAD_DIM)}
            for i in range(len(model.blocks))}


def rollout(model, kv, snapshots=None):
    """Every read step's prediction; ``snapshots`` collects block 0's coarse cache after each prefill."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(B, 8, 32, generator=gen)
    output = torch.zeros(B, sum(PART), C, H, W)
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    preds = []
    for c, frames in enumerate(PART):
        f0, f1 = sum(PART[:c]), sum(PART[: c + 1])
        x = torch.randn(B, frames, C, H, W, generator=gen)
        for i, t in enumerate(STEPS):
            r = STEPS[i + 1] if i + 1 < len(STEPS) else 0
            with torch.no_grad():
                pred, _ = model(hidden_states=x, timestep=torch.full((B, frames), t),
                                r_timestep=torch.full((B, frames), r), encoder_hidden_states=text, return_dict=False,
                                chunk_partition=list(PART[: c + 1]), kv_cache=kv, kv_cache_flag=copy.deepcopy(flag))
            preds.append(pred)
            x = x - (t - r) / 1000 * pred
        output[:, f0:f1] = x
        if c < len(PART) - 1:  # encode_kv_cache
            flag["is_cache_step"] = True
            zero = torch.zeros(B, f1, dtype=torch.long)
            mask = model.build_attention_mask(chunk_partition=list(PART[: c + 1]), height=H, width=W, device="cpu",
                                              mode="cache")
            with torch.no_grad():
                model(hidden_states=output[:, :f1], chunk_partition=list(PART[: c + 1]), timestep=zero,
                      r_timestep=zero, encoder_hidden_states=text, attention_mask=mask, return_dict=False,
                      kv_cache=kv, kv_cache_flag=copy.deepcopy(flag))
            flag["num_cached_chunks"] += 1
            flag["is_cache_step"] = False
            if snapshots is not None:
                snapshots.append(kv[0]["compressed_cache"].clone())
    return preds


@pytest.fixture(scope="module")
def reference(model):
    snapshots = []
    return rollout(model, upstream_cache(model), snapshots), snapshots


@pytest.fixture
def no_history_read(monkeypatch):
    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)


def test_the_coarse_context_only_grows(reference):
    """What the adapter relies on to append the coarse context once: a re-encoding leaves the
    coarse chunks already cached unchanged (the prefill mask is chunk-causal) up to fp32 rounding
    (the prefill recomputes them in longer matrix products, which round differently)."""
    _, snapshots = reference
    sizes = [max(0, c + 1 - (LIMIT - 1)) for c in range(len(snapshots))]  # coarse chunks after prefill c
    compared = 0
    for before, after, n in zip(snapshots, snapshots[1:], sizes):
        tokens = sum(PART[:n]) * COARSE
        if tokens:
            old, new = before[..., :tokens, :], after[..., :tokens, :]
            assert (old - new).abs().max() <= 1e-5 * old.abs().max()
            compared += 1
    assert compared == 2


@pytest.mark.parametrize("recent_full_precision,prefill",
                         [(True, "full"), (False, "full"), (True, "incremental"), (False, "incremental")])
def test_lossless_rollout_matches_the_upstream_cache(model, reference, no_history_read, recent_full_precision, prefill):
    ref, _ = reference
    with adapter.install(model, "fp32", span_chunks=2, recent_full_precision=recent_full_precision,
                         prefill=prefill) as handle:
        rollout(model, handle.kv_cache())
        ours = rollout(model, handle.kv_cache())  # a second video on the same handle starts afresh
        context, recent = handle.cache.layer(0), handle.recent.layer(0)
        assert len(context.spans) == 1 and context.tokens == sum(PART[:3]) * COARSE
        assert recent.tokens == sum(PART[3:5]) * FULL and len(recent.spans) == (0 if recent_full_precision else 1)
    # fp32 rounding only: attention summed per segment (log-sum-exp merge) instead of one flex call
    for a, b in zip(ref, ours, strict=True):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    assert not any("processor" in vars(b.attn1) and isinstance(b.attn1.processor, adapter.FARCacheProcessor)
                   for b in model.blocks)
    assert "_forward_cache" not in vars(model)


def test_an_incremental_prefill_runs_only_what_the_caches_lack(model):
    """Per prefill, block 0 sees the coarse chunks the cache lacks (the one just demoted from full
    resolution) and the full-resolution chunks; a second video starts from its first chunk."""
    seen = []

    def record(module, args):
        seen.append(args[0].shape[1])

    hook = model.blocks[0].register_forward_pre_hook(record)
    try:
        with adapter.install(model, "fp32", span_chunks=2, prefill="incremental") as handle:
            for _ in range(2):
                seen.clear()
                rollout(model, handle.kv_cache())
                prefills = seen[len(STEPS)::len(STEPS) + 1]  # each chunk: its read steps, then the prefill
                expected = []
                for c in range(len(PART) - 1):
                    coarse = max(0, c + 1 - (LIMIT - 1))  # coarse chunks of the context after chunk c
                    cached = max(0, coarse - 1)  # all but the newest were cached by the last prefill
                    expected.append(sum(PART[cached:coarse]) * COARSE + sum(PART[coarse : c + 1]) * FULL)
                assert prefills == expected and max(expected) < sum(PART[:-1]) * FULL
    finally:
        hook.remove()


def test_an_incremental_prefill_starts_afresh_when_the_cache_holds_no_whole_chunks(model):
    """A cache whose coarse context is not a run of this context's chunks (blocks holding different
    counts, or a count between chunk edges) is emptied, and every chunk goes through the blocks."""
    with adapter.install(model, "fp32", prefill="incremental") as handle:
        k = torch.randn(B, HEADS, 3, HEAD_DIM)
        handle.cache.layer(0).append(k, k)
        tokens = [4, 8, 8, 32, 32]
        assert handle.plan_prefill(tokens, 3, first_video_prefill=False) == 0  # 3 tokens vs 0 in block 1
        assert handle.plan.new and handle.cache.layer(0).tokens == 0 and handle.plan.chunk_tokens == tokens
        for i in range(len(model.blocks)):
            handle.cache.layer(i).append(torch.randn(B, HEADS, 12, HEAD_DIM), torch.randn(B, HEADS, 12, HEAD_DIM))
        assert handle.plan_prefill(tokens, 3, first_video_prefill=False) == 2  # chunks 0 and 1 held
        assert not handle.plan.new and handle.plan.chunk_tokens == [8, 32, 32] and handle.plan.coarse_tokens == 8
        assert handle.plan_prefill(tokens, 3, first_video_prefill=True) == 0 and handle.cache.layer(1).tokens == 0
        handle.plan = None
        for i in range(len(model.blocks)):
            handle.cache.layer(i).append(torch.randn(B, HEADS, 6, HEAD_DIM), torch.randn(B, HEADS, 6, HEAD_DIM))
        assert handle.plan_prefill(tokens, 3, first_video_prefill=False) == 0 and handle.plan.new  # 6: mid-chunk
        handle.plan = None


def test_an_incremental_prefill_with_clean_frames_is_upstreams(model):
    """Training's prefill (clean frames given) goes to upstream's ``_forward_cache`` unchanged."""
    calls = []
    with adapter.install(model, "fp32", prefill="incremental") as handle:
        forward = adapter._incremental_forward_cache(model, handle, lambda **kw: calls.append(kw) or "upstream")
        assert forward(hidden_states=1, chunk_partition=[1], timestep=2, r_timestep=3, encoder_hidden_states=4,
                       clean_hidden_states=5, clean_timestep=6, kv_cache=7, kv_cache_flag=8) == "upstream"
    assert calls[0]["clean_hidden_states"] == 5 and calls[0]["kv_cache_flag"] == 8


def test_install_refuses_an_unknown_prefill(model):
    with pytest.raises(ConfigError, match="prefill"):
        adapter.install(model, "fp32", prefill="partial")


@pytest.mark.parametrize("guidance", [1.0, 3.0])  # 3.0: classifier-free guidance, a batch of 2 in the caches
def test_the_pipeline_runs_unchanged_without_its_cache_tensors(model, no_history_read, guidance):
    """``AnyFlowFARPipeline.__call__`` itself (prompt embeddings given, latents out): installed on
    the pipeline, the same latents as its own cache within fp32 rounding, while the per-block
    cache tensors it allocates are views of a single zero (nothing of the bf16 cache's size is
    allocated); ``remove()`` gives the pipeline back its class, and a call that fails leaves no
    interception behind."""
    from diffusers import AnyFlowFARPipeline
    from diffusers.schedulers import FlowMapEulerDiscreteScheduler

    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    text, negative = torch.randn(2, B, 8, 32, generator=torch.Generator().manual_seed(2))

    def generate(**kw):
        # (upstream's __call__ takes negative embeddings without guidance into a batch of 2 text rows)
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative if guidance > 1 else None,
                    height=8 * H, width=8 * W, num_frames=4 * (sum(PART) - 1) + 1, num_inference_steps=3,
                    guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **kw).frames

    ref = generate()
    caches = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: caches.append(kw["kv_cache"]), with_kwargs=True)
    try:
        with adapter.install(pipe, "fp32", span_chunks=2):
            assert type(pipe).__name__ == "AnyFlowFARPipeline" and type(pipe) is not AnyFlowFARPipeline
            ours = generate()
            with pytest.raises(ValueError, match="chunk_partition"):
                generate(chunk_partition=[1, 2])
    finally:
        hook.remove()
    assert type(pipe) is AnyFlowFARPipeline
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    views = [t for block in caches[-1].values() for t in block.values()]
    assert len(views) == 2 * len(model.blocks) and all(t.untyped_storage().nbytes() == t.element_size() for t in views)
    assert {t.shape[1] for t in views} == {2 if guidance > 1 else 1}
    assert torch.zeros(2, 1, HEADS, 5, HEAD_DIM).stride()[0] > 0  # nothing intercepts torch.zeros any more


def test_only_the_cache_allocation_becomes_a_view():
    """While the pipeline allocates, ``torch.zeros`` of [2, batch, heads, tokens, head_dim] in the
    transformer's dtype is a view of one zero that upstream's writes fail on; other shapes and dtypes are
    allocated as always, and nothing is intercepted once the mode is closed."""
    mode = adapter._CacheTensorsAsViews(HEADS, HEAD_DIM, torch.float32)
    mode.__enter__()
    try:
        cache = torch.zeros((2, 3, HEADS, 7, HEAD_DIM), dtype=torch.float32)
        others = [torch.zeros((2, 3, HEADS, 7, HEAD_DIM), dtype=torch.float64),
                  torch.zeros((2, 3, HEADS + 1, 7, HEAD_DIM), dtype=torch.float32),
                  torch.zeros(3, 3, HEADS, 7, HEAD_DIM, dtype=torch.float32)]
    finally:
        mode.close()
    assert cache.shape == (2, 3, HEADS, 7, HEAD_DIM) and cache.stride() == (0,) * 5 and not cache.any()
    with pytest.raises(RuntimeError, match="single memory location"):  # as upstream's prefill would write it
        cache[0, :, :, :2, :] = torch.ones(3, HEADS, 2, HEAD_DIM)
    assert all(t.stride()[-1] == 1 and t.stride()[0] > 0 for t in others)
    assert torch.zeros((2, 3, HEADS, 7, HEAD_DIM), dtype=torch.float32).stride()[0] > 0


def test_the_guard_catches_a_path_that_reads_the_history(model, no_history_read):
    with adapter.install(model, "fp32", span_chunks=2, attention="read") as handle:
        with pytest.raises(AssertionError, match="decompressed the whole history"):
            rollout(model, handle.kv_cache())


@pytest.mark.parametrize("prefill", ["full", "incremental"])
def test_qvg_stays_close_and_stores_less(model, reference, bounded_spans, prefill):
    ref, _ = reference
    with adapter.install(model, qkv.build_policy("qvg", clusters=4, block=16), span_chunks=2,
                         prefill=prefill) as handle:
        ours = rollout(model, handle.kv_cache())
        mem = handle.memory()
    assert bounded_spans  # every compressed span within its guaranteed error bound
    drift = [float((b - a).norm() / a.norm()) for a, b in zip(ref, ours)]
    assert max(drift[:3]) <= 1e-5  # chunk 0 attends to nothing cached
    assert 0 < max(drift) < 0.02  # measured 4.5e-3 (4 clusters, blocks of 16), both prefills
    assert mem.bits_per_element < 8  # of 32 (an fp32 model); the newest coarse chunk waits in fp32 for its span


def test_the_recent_context_starts_from_the_centroids_it_replaces(model, monkeypatch):
    """Every prefill re-encodes the full-resolution context, which overlaps the last one in all but
    a chunk: its k-means is warm-started from the centroids of the context it replaces, except at
    a video's first prefill (nothing of the last video carries over)."""
    with adapter.install(model, qkv.build_policy("qvg", clusters=4, block=16), span_chunks=2) as handle:
        layer = handle.recent.layer(0)
        warm = []
        compress = layer._compress

        def recording(k, v, start):
            warm.append(start is not None and layer._warm_fits(start, k.shape))
            return compress(k, v, start)

        monkeypatch.setattr(layer, "_compress", recording)
        rollout(model, handle.kv_cache())
        rollout(model, handle.kv_cache())
    prefills = len(PART) - 1
    assert warm == ([False] + [True] * (prefills - 1)) * 2


def test_a_prefill_compresses_its_blocks_in_passes(model, compress_passes):
    """A prefill's K/V wait until ``blocks_per_pass`` blocks (or the last block) wrote theirs, then
    each cache compresses all of them in one pass; the caches equal those of block-by-block
    passes bit for bit, and what waits is counted in ``memory()``."""
    policy = qkv.build_policy("qvg", clusters=4, block=16)
    passes = compress_passes
    runs = {}
    for per_pass in (1, 2):
        passes.clear()
        with adapter.install(model, policy, span_chunks=1, blocks_per_pass=per_pass) as handle:
            preds = rollout(model, handle.kv_cache())
            runs[per_pass] = preds, list(passes), handle.memory()
    # per prefill, both blocks at once: the full-resolution context (5 prefills), and the new coarse
    # chunk (3 prefills: the first two have no coarse context yet)
    assert runs[2][1] == [2] * 2 + [2, 2] * 3
    assert runs[1][1] == [1] * 2 * 2 + [1, 1] * 2 * 3
    assert all(torch.equal(a, b) for a, b in zip(runs[1][0], runs[2][0], strict=True)) and runs[1][2] == runs[2][2]
    with adapter.install(model, policy, span_chunks=1, blocks_per_pass=8) as handle:
        flag = {"num_cached_chunks": 0, "num_compressed_tokens": 0}
        k = torch.randn(1, HEADS, 2 * FULL, HEAD_DIM)
        rope = torch.ones(1, 1, 2 * FULL, HEAD_DIM // 2, dtype=torch.complex128)  # no rotation
        empty = torch.zeros(1, HEADS, 0, HEAD_DIM)
        handle.prefill(0, {"compressed_cache": (empty, empty), "full_cache": (k, k)}, rope, flag)
        assert handle.memory().tail == 2 * k.numel() * k.element_size()  # block 0 waits for block 1
    with pytest.raises(ConfigError, match="blocks_per_pass"):
        adapter.install(model, policy, blocks_per_pass=0)


def test_a_read_step_before_the_prefill_raises(model):
    with adapter.install(model, "fp32") as handle:
        flag = {"num_cached_chunks": 1, "is_cache_step": False}
        x = torch.randn(B, 2, C, H, W)
        with pytest.raises(CacheError, match="cache-prefill"), torch.no_grad():
            model(hidden_states=x, timestep=torch.full((B, 2), 500), r_timestep=torch.full((B, 2), 0),
                  encoder_hidden_states=torch.randn(B, 8, 32), chunk_partition=[1, 2], kv_cache=handle.kv_cache(),
                  kv_cache_flag=flag)


def test_context_parallelism_is_refused(model, monkeypatch):
    """diffusers has no context-parallel plan for this model; one given by hand is refused at
    install and at the first cached forward (enable_parallelism after install)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    with adapter.install(model, "fp32") as handle:
        monkeypatch.setattr(model, "_parallel_config",
                            ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2)))
        with pytest.raises(ConfigError, match="no context-parallel plan"):
            rollout(model, handle.kv_cache())
        with pytest.raises(ConfigError, match="no context-parallel plan"):
            adapter.install(model, "fp32")


def _reference_mask(chunk_tokens):
    """``create_block_mask`` of the chunk-causal mask, evaluated on every (query, key) pair."""
    from torch.nn.attention.flex_attention import create_block_mask

    real = sum(chunk_tokens)
    padded = -(-real // 128) * 128
    chunk = torch.zeros(padded, dtype=torch.long)
    chunk[:real] = torch.repeat_interleave(torch.arange(len(chunk_tokens)), torch.tensor(chunk_tokens))

    def mask_mod(b, h, q, kv):
        return (chunk[q] >= chunk[kv]) & (q < real) & (kv < real)

    return create_block_mask(mask_mod, None, None, padded, padded, device="cpu")


BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                "full_q_num_blocks", "full_q_indices")


def assert_same_block_mask(ours, ref):
    """Same blocks in the same order, same sizes, the same mask on every (query, key) pair."""
    from torch.nn.attention.flex_attention import create_mask

    assert ours.seq_lengths == ref.seq_lengths and ours.BLOCK_SIZE == ref.BLOCK_SIZE
    for name in BLOCK_FIELDS:
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    n = ref.seq_lengths[0]
    assert torch.equal(create_mask(ours.mask_mod, 1, 1, n, n, "cpu"), create_mask(ref.mask_mod, 1, 1, n, n, "cpu"))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=6).filter(sum))
def test_the_chunk_causal_mask_is_create_block_masks(chunk_tokens):
    """Built from each block's first and last chunk, the mask equals the one evaluated on every pair:
    chunks that straddle blocks, blocks of one chunk, sequences that end on a block's edge or not."""
    assert_same_block_mask(adapter.chunk_causal_block_mask(chunk_tokens, "cpu"), _reference_mask(chunk_tokens))


@pytest.mark.parametrize("chunk_tokens", [[128], [64, 64, 128], [1], [0, 5, 0, 200]])
def test_the_chunk_causal_mask_on_block_edges(chunk_tokens):
    assert_same_block_mask(adapter.chunk_causal_block_mask(chunk_tokens, "cpu"), _reference_mask(chunk_tokens))


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=6), st.integers(1, 24), st.integers(1, 24), st.integers(2, 4))
def test_the_cache_mask_is_upstreams(part, h, w, limit):
    """:func:`cache_block_mask` is upstream's ``build_attention_mask(mode="cache")``: coarse chunks,
    then the newest ``limit - 1`` at full resolution, several blocks of 128 tokens (and frames
    smaller than a coarse patch: coarse chunks of no tokens)."""
    from types import SimpleNamespace

    fake = SimpleNamespace(config=SimpleNamespace(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
                                                  full_chunk_limit=limit))
    height, width = 2 * h, 2 * w
    ref = far.AnyFlowFARTransformer3DModel.build_attention_mask(fake, chunk_partition=part, height=height, width=width,
                                                                device="cpu", mode="cache")
    assert_same_block_mask(adapter.cache_block_mask(fake, part, height, width, "cpu"), ref)


def test_install_builds_the_prefill_mask_blockwise(model):
    """Installed, the model's cache-mode mask is built blockwise (the same mask); other modes are
    upstream's own; ``remove()`` restores the method."""
    upstream = model.build_attention_mask
    kw = dict(chunk_partition=[1, 2, 2, 2], height=24, width=40, device="cpu")
    with adapter.install(model, "fp32"):
        assert "build_attention_mask" in vars(model)
        assert_same_block_mask(model.build_attention_mask(**kw, mode="cache"), upstream(**kw, mode="cache"))
        train = model.build_attention_mask(**kw, mode="train")
        assert torch.equal(train.kv_indices, upstream(**kw, mode="train").kv_indices)
        with pytest.raises(ValueError, match="Unknown mode"):
            model.build_attention_mask(**kw, mode="bogus")
    assert "build_attention_mask" not in vars(model)


@pytest.mark.parametrize("bad", [[], [0, 0], [2, -1], [2.0]])
def test_a_chunk_causal_mask_needs_token_counts(bad):
    with pytest.raises(CacheError, match="not all 0"):
        adapter.chunk_causal_block_mask(bad)
