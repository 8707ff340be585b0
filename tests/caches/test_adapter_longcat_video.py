"""qkv.adapters.longcat_video against a restatement of LongCat-Video's DiT and condition cache
(upstream_longcat_video.py: LongCat-Video is not pip-installable): ``generate_vc``'s cached
continuation, tiny config, random weights, fp32 on the CPU."""

from __future__ import annotations

import pytest
import torch
import upstream_longcat_video as upstream

import qkv
from qkv.caches.adapters import longcat_video as adapter
from qkv.caches.adapters.longcat_video import CondKV
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError, GradientError

pytestmark = pytest.mark.usefixtures("one_thread")

C, COND, NOISE, HW = 4, 2, 3, 8  # latent channels, condition / noise latent frames, latent height = width
TOKENS = (HW // 2) ** 2  # tokens per latent frame (patches of 1 x 2 x 2)
TEXT, CAPTION = 6, 32
SIGMAS = torch.tensor([1.0, 0.7, 0.4, 0.0])


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return upstream.LongCatVideoTransformer3DModel(in_channels=C, out_channels=C, caption_channels=CAPTION).eval()


def inputs(batch=1, cfg=True, seed=1):
    """(latents [B, C, COND + NOISE, HW, HW], prompt embeddings and mask, CFG rows negative first)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, C, COND + NOISE, HW, HW, generator=gen)
    rows = 2 * batch if cfg else batch
    embeds = torch.randn(rows, 1, TEXT, CAPTION, generator=gen)
    mask = torch.ones(rows, TEXT, dtype=torch.long)
    mask[0, -2:] = 0  # the negative prompt is shorter: the varlen cross attention
    return latents, embeds, mask


def continuation(dit, batch=1, cfg=True, **kwargs):
    latents, embeds, mask = inputs(batch, cfg)
    return upstream.generate_vc(dit, latents, COND, embeds, mask, SIGMAS, guidance_scale=4.0 if cfg else 1.0, **kwargs)


def condition(dit, latents, *args, **kwargs):
    """The condition pass as upstream's pipeline runs it (``generate_vc`` is under ``torch.no_grad``)."""
    with torch.no_grad():
        return upstream.cache_clean_latents(dit, latents, *args, **kwargs)


def close(a, b, tol=1e-5):
    return (a - b).abs().max() <= tol * a.abs().max()


@pytest.fixture
def no_history_read(monkeypatch):
    """Fails the test if anything decompresses a layer's whole history (``LayerCache.read``)."""

    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    monkeypatch.setattr(LayerCache, "read", read)


@pytest.mark.parametrize("batch, cfg", [(1, True), (2, False)], ids=["cfg-pair-on-a-batch-1-condition", "batch-2"])
def test_lossless_continuation_matches_the_upstream_cache(dit, no_history_read, batch, cfg):
    ref_preds, ref = continuation(dit, batch, cfg)
    with adapter.install(dit, "fp32") as handle:
        kv = condition(dit, inputs(batch, cfg)[0][:, :, :COND], TEXT, CAPTION)
        assert isinstance(kv[0][0], CondKV) and kv[0][0].shape == (batch, 4, COND * TOKENS, 16)
        layer = kv[0][0].cache.layer(0)
        assert handle.cache is None  # the pass is over: its dict alone holds its cache
        assert len(layer.spans) == 1 and layer.tokens == COND * TOKENS  # the condition: one compressed span
        preds, ours = continuation(dit, batch, cfg, kv_cache_dict=kv)
        assert handle.memory().tokens == 2 * COND * TOKENS  # 2 blocks
    # fp32 rounding only: attention summed per segment (log-sum-exp merge) instead of at once
    assert all(close(a, b) for a, b in zip(ref_preds, preds, strict=True)) and close(ref, ours)
    assert "forward_with_kv_cache" not in vars(dit.blocks[0].attn)  # removed: upstream's own methods again
    assert handle.memory().tokens == 0


def test_the_cached_continuation_equals_the_uncached_one(dit):
    """Upstream's condition cache is exact (the condition tokens attend only to themselves, at t = 0),
    and so is the adapter's: without CFG (whose scale upstream computes over the condition frames
    too when uncached) it matches upstream's ``use_kv_cache=False`` path."""
    uncached_preds, _ = continuation(dit, cfg=False, use_kv_cache=False)
    with adapter.install(dit, "fp32"):
        preds, _ = continuation(dit, cfg=False)
    assert all(close(a[:, :, COND:], b) for a, b in zip(uncached_preds, preds, strict=True))


def test_the_guard_catches_a_path_that_reads_the_history(dit, no_history_read):
    with adapter.install(dit, "fp32", attention="read"):
        with pytest.raises(AssertionError, match="decompressed the whole history"):
            continuation(dit)


def test_qvg_stays_close_and_stores_less(dit, bounded_spans):
    ref_preds, ref = continuation(dit)
    with adapter.install(dit, qkv.build_policy("qvg", clusters=4, block=16)) as handle:
        kv = condition(dit, inputs()[0][:, :, :COND], TEXT, CAPTION)
        preds, ours = continuation(dit, kv_cache_dict=kv)
        mem = handle.memory()
    assert len(bounded_spans) == 2  # one span per block, each within its guaranteed error bound
    drift = max(float((b - a).norm() / a.norm()) for a, b in zip(ref_preds, preds))
    assert 0 < drift < 0.02  # measured 0.0042 (4 clusters, blocks of 16, one 32-token span per block)
    fp32 = 2 * 2 * COND * TOKENS * 4 * 16 * 4  # blocks, K and V, tokens, 4 heads of 16, 4 bytes
    assert 0 < mem.compressed * 3 < fp32 and mem.reserved == 0  # no tail buffer kept for a one-shot condition


def test_a_dict_made_before_install_stays_upstreams_and_dicts_stay_apart(dit):
    latents = inputs()[0]
    plain = condition(dit, latents[:, :, :COND], TEXT, CAPTION)
    ref_preds, _ = continuation(dit, kv_cache_dict=plain)
    with adapter.install(dit, "fp32", span_tokens=TOKENS) as handle:
        preds, _ = continuation(dit, kv_cache_dict=plain)  # plain tensors: upstream's own read
        assert all(torch.equal(a, b) for a, b in zip(ref_preds, preds)) and handle.memory().tokens == 0
        first = condition(dit, latents[:, :, :COND], TEXT, CAPTION)
        other = torch.randn_like(latents[:, :, :COND])
        second = condition(dit, other, TEXT, CAPTION, offload_kv_cache=True)
        assert first[1][0].cache is not second[1][0].cache
        assert len(second[1][0].cache.layer(1).spans) == COND  # span_tokens: a span per frame
        assert handle.memory().tokens == 2 * 2 * COND * TOKENS  # both dicts alive
        preds, _ = continuation(dit, kv_cache_dict=first)
        assert all(close(a, b) for a, b in zip(ref_preds, preds))
        del second
        assert handle.memory().tokens == 2 * COND * TOKENS  # a dropped dict frees its cache
        handle.reset()
        assert handle.memory().tokens == 0
        with pytest.raises(CacheError, match="reset"):
            continuation(dit, kv_cache_dict=first)


def test_what_upstream_cannot_do_or_this_adapter_does_not_reproduce_raises(dit):
    with adapter.install(dit, "fp32"):
        with pytest.raises(CacheError, match="batch of 4"):  # upstream: an AssertionError
            continuation(dit, batch=2, cfg=True)
        latents, embeds, mask = inputs()
        kv = condition(dit, latents[:, :, :COND], TEXT, CAPTION)
        with pytest.raises(CacheError, match="covers 16 tokens"):
            upstream.generate_vc(dit, latents[:, :, 1:], 1, embeds, mask, SIGMAS, kv_cache_dict=kv)
        dit.enable_bsa()
        try:
            with pytest.raises(CacheError, match="disable_bsa"):
                continuation(dit, kv_cache_dict=kv)
        finally:
            dit.disable_bsa()
    with pytest.raises(ConfigError, match="sink_chunks"):
        adapter.install(dit, "fp32", sink_chunks=1)
    with pytest.raises(ConfigError, match="LongCatVideoTransformer3DModel"):
        adapter.install(dit.blocks[0], "fp32")
    dit.cp_split_hw = [1, 2]
    try:
        with pytest.raises(ConfigError, match="context parallelism"):
            adapter.install(dit, "fp32")
    finally:
        dit.cp_split_hw = [1, 1]
    assert "forward" not in vars(dit.blocks[0].attn)


def test_a_condition_pass_with_gradients_is_refused(dit):
    with adapter.install(dit, "fp32"), pytest.raises(GradientError, match="requires grad"):
        upstream.cache_clean_latents(dit, inputs()[0][:, :, :COND], TEXT, CAPTION)
