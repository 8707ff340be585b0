"""qkv.adapters.hy_worldplay against a restatement of HY-WorldPlay's AR rollout (upstream_hy_worldplay.py:
HY-WorldPlay is not pip-installable): 8 chunks of 4 latent frames, memory retrieval from chunk 6 on,
CFG, tiny config, random weights, fp32 on the CPU.

Upstream re-encodes the whole selection at every chunk; the adapter encodes each frame once (its
purpose), so its outputs equal upstream's own loop only while the two coincide (chunks 0 and 1).
Beyond, :func:`reference_rollout` is the reference: upstream's loop, model and cache layout with
the adapter's one change (each frame encoded once, when first selected, attending to the stored
selected frames) kept in full precision, its keys re-roped to their current packed position for
every read, read by upstream's ``sequence_parallel_attention_vision``.
"""

from __future__ import annotations

import math

import pytest
import torch
import upstream_hy_worldplay as upstream

import qkv
from qkv import kernels
from qkv.caches.adapters import hy_worldplay as adapter
from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
from qkv.errors import CacheError, ConfigError, ShapeError

pytestmark = pytest.mark.usefixtures("one_thread")

C, CHUNKS, HW, HEADS, HEAD_DIM = 4, 8, 2, 2, 32
FRAMES = 4 * CHUNKS
TOKENS = HW * HW  # tokens per latent frame (patch 1)
TIMESTEPS = torch.tensor([900.0, 500.0, 100.0])


def cameras(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """w2c [1, FRAMES, 4, 4] of a camera that walks forward while turning away and back (so the
    retrieval prefers some old clips over others), intrinsics [1, FRAMES, 3, 3]."""
    yaw = torch.cat([torch.linspace(0, 1.6, FRAMES // 2), torch.linspace(1.6, 0.2, FRAMES - FRAMES // 2)])
    w2c = torch.eye(4).repeat(FRAMES, 1, 1)
    c, s = torch.cos(yaw), torch.sin(yaw)
    w2c[:, 0, 0], w2c[:, 0, 2], w2c[:, 2, 0], w2c[:, 2, 2] = c, -s, s, c
    w2c[:, 2, 3] = -0.2 * torch.arange(FRAMES) + 0.05 * torch.randn(FRAMES, generator=gen)
    ks = torch.tensor([[1.2, 0, 0.5], [0, 1.2, 0.5], [0, 0, 1.0]]).repeat(1, FRAMES, 1, 1)
    return w2c[None], ks


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = upstream.HunyuanVideo_1_5_DiffusionTransformer(in_channels=C, hidden_size=HEADS * HEAD_DIM,
                                                           heads_num=HEADS).eval()
    model.add_action_parameters()  # upstream zero-initializes the modulations and the PRoPE projection
    gen = torch.Generator().manual_seed(1)
    points = torch.randn(300, 3, generator=gen) * 4
    pipe = upstream.HunyuanVideo_1_5_Pipeline(model, TIMESTEPS, CHUNKS, points)
    viewmats, ks = cameras(gen)
    inputs = dict(
        latents=torch.randn(1, C, FRAMES, HW, HW, generator=gen), timesteps=TIMESTEPS,
        prompt_embeds=torch.randn(2, 6, 24, generator=gen), prompt_mask=torch.tensor([[1] * 4 + [0] * 2, [1] * 6]),
        vision_states=torch.zeros(2, 1, 8), cond_latents=torch.randn(1, C + 1, FRAMES, HW, HW, generator=gen),
        task_type="i2v", extra_kwargs={"byt5_text_states": torch.zeros(2, 3, 8), "byt5_text_mask": torch.ones(2, 3)},
        viewmats=viewmats, Ks=ks, action=torch.randint(0, 4, (1, FRAMES), generator=gen).float(), device="cpu")
    return pipe, inputs


def rollout(pipe, inputs):
    with torch.no_grad():
        return pipe._ar_rollout_inner(**{**inputs, "latents": inputs["latents"].clone()})


def time_shift(model, k: torch.Tensor, shift: int) -> torch.Tensor:
    """Keys [2B, H, S, D] with the RoPE stream (first B rows) moved ``shift`` time positions."""
    cos, sin = upstream.get_nd_rotary_pos_embed(model.rope_dim_list, (shift, 0, 0), (shift + 1, 1, 1),
                                                theta=model.rope_theta, use_real=True)
    b = k.shape[0] // 2
    moved = (k[:b].float() * cos + upstream.rotate_half(k[:b].float()) * sin).type_as(k)
    return torch.cat([moved, k[b:]])


def reference_rollout(pipe, inputs):
    """Upstream's ``_ar_rollout_inner`` with each frame encoded once (see the module docstring)."""
    model, n = pipe.transformer, pipe.chunk_latent_frames
    latents = inputs["latents"].clone()
    pipe.init_kv_cache()
    branches = [(1, pipe._kv_cache), (0, pipe._kv_cache_neg)]
    ex = inputs["extra_kwargs"]
    with torch.no_grad():
        texts = [model(bi_inference=False, ar_txt_inference=True, ar_vision_inference=False,
                       timestep_txt=torch.tensor([0.0]), text_states=inputs["prompt_embeds"][row, None],
                       encoder_attention_mask=inputs["prompt_mask"][row, None], vision_states=None,
                       extra_kwargs={k: v[row, None] for k, v in ex.items()}, kv_cache=kv, cache_txt=True)
                 for row, kv in branches]
        stores = [{} for _ in branches]  # per branch: frame -> (RoPE position, [(k, v) per block])

        def caches(text, store, rank):
            """Upstream's dicts for a pass: k_vision / v_vision of the stored selected frames."""
            frames = [f for f in sorted(rank, key=rank.get) if f in store]
            out = []
            for block, t in enumerate(text):
                if not frames:
                    out.append(dict(t))
                    continue
                ks = [time_shift(model, store[f][1][block][0], rank[f] - store[f][0]) for f in frames]
                vs = [store[f][1][block][1] for f in frames]
                out.append({**t, "k_vision": torch.cat(ks, 2), "v_vision": torch.cat(vs, 2)})
            return out

        def call(hidden, frames, kv, first, t):
            return model(bi_inference=False, ar_txt_inference=False, ar_vision_inference=True, hidden_states=hidden,
                         timestep=torch.full((len(frames),), t), timestep_r=None, return_dict=False,
                         viewmats=inputs["viewmats"][:, frames], Ks=inputs["Ks"][:, frames],
                         action=inputs["action"][:, frames], kv_cache=kv, cache_vision=False,
                         rope_temporal_size=first + len(frames), start_rope_start_idx=first)

        for chunk_i in range(pipe.chunk_num):
            current = chunk_i * n
            selected = []
            if chunk_i > 0:
                selected = [f for f in upstream.select_aligned_memory_frames(
                    inputs["viewmats"][0].numpy(), current, memory_frames=20, temporal_context_size=12,
                    pred_latent_size=4, points_local=pipe.points_local) if f < current]
            rank = {f: r for r, f in enumerate(selected)}
            for text, store in zip(texts, stores):
                new = [f for f in selected if f not in store]  # the previous chunk (one run of ranks here)
                if not new:
                    continue
                recorded = []
                attend = upstream.sequence_parallel_attention_vision

                def record(q, k, v, block_idx=None, kv_cache=None, cache_vision=False):
                    recorded.append((torch.cat(k, 0).transpose(1, 2), torch.cat(v, 0).transpose(1, 2)))
                    return attend(q, k, v, block_idx=block_idx, kv_cache=kv_cache, cache_vision=cache_vision)

                upstream.sequence_parallel_attention_vision = record
                try:
                    hidden = torch.cat([latents[:, :, new], inputs["cond_latents"][:, :, new]], 1)
                    call(hidden, new, caches(text, store, rank), rank[new[0]], 14.0)
                finally:
                    upstream.sequence_parallel_attention_vision = attend
                for j, f in enumerate(new):
                    frame = slice(j * TOKENS, (j + 1) * TOKENS)
                    store[f] = (rank[f], [(k[:, :, frame], v[:, :, frame]) for k, v in recorded])
            kvs = [caches(text, store, rank) for text, store in zip(texts, stores)]
            for t in inputs["timesteps"]:
                chunk = list(range(current, current + n))
                hidden = torch.cat([latents[:, :, chunk], inputs["cond_latents"][:, :, chunk]], 1)
                pos, neg = (call(hidden, chunk, kv, len(selected), t)[0] for kv in kvs)
                latents[:, :, chunk] = pipe.scheduler.step(neg + pipe.guidance_scale * (pos - neg), t,
                                                           latents[:, :, chunk])[0]
    return latents


def close(a, b, tol=1e-5):
    return (a - b).abs().max() <= tol * a.abs().max()


@pytest.fixture
def no_history_read(monkeypatch):
    """Fails the test if the forward path decompresses a layer's history (``LayerCache.read``) or
    more than one stored clip at once."""

    def read(self):
        raise AssertionError("the forward path decompressed the whole history")

    materialize = kernels.CompressedSpan.materialize

    def one_clip(self, backend="auto"):
        assert self.tokens <= 4 * TOKENS, "more than one clip decompressed at once"
        return materialize(self, backend)

    monkeypatch.setattr(LayerCache, "read", read)
    monkeypatch.setattr(kernels.CompressedSpan, "materialize", one_clip)


@pytest.fixture(scope="module")
def reference(setup):
    return reference_rollout(*setup)


def test_lossless_rollout_matches_the_store_in_upstreams_layout(setup, reference, no_history_read, monkeypatch):
    pipe, inputs = setup
    shifts = []
    reads = adapter.FrameStore.reads
    def spy(self, rank):
        shifts.extend(reads(self, rank))
        return reads(self, rank)

    monkeypatch.setattr(adapter.FrameStore, "reads", spy)
    with adapter.install(pipe, "fp32") as handle:
        ours = rollout(pipe, inputs)
        store = handle.stores[0]
        assert len(store.clips) == CHUNKS - 1 and len(store.cache.layer(0).spans) == CHUNKS - 1  # a span per clip
        mem = handle.memory()
        text = sum(d["k_txt"].shape[2] for d in pipe._kv_cache + pipe._kv_cache_neg)
        assert mem.tokens == 2 * 2 * (FRAMES - 4) * TOKENS + text  # 2 branches x 2 blocks, all but the last chunk
        assert mem.tail == 2 * text * HEADS * HEAD_DIM * 4 and mem.reserved == 0  # the text K/V, exact; no buffers
        # the RoPE stream's keys and the values in the cache, the PRoPE keys beside it: 3 tensors, not 4
        assert store.cache.layer(0).layout.batch == 1 and len(store.prope_keys[0]) == CHUNKS - 1
        assert mem.compressed == 2 * 2 * (FRAMES - 4) * TOKENS * 3 * HEADS * HEAD_DIM * 4
        with pytest.raises(AssertionError, match="whole history"):
            store.cache.read(0)  # the guard is live
    assert {s for _, s in shifts} > {0}  # packed positions moved stored clips: queries were shifted
    # fp32 rounding only: RoPE shifts composed (reference) or direct (adapter), attention merged per clip
    assert close(reference, ours)
    assert "_ar_rollout_inner" not in vars(pipe) and "forward_vision" not in vars(pipe.transformer.double_blocks[0])


def test_where_upstream_encodes_the_same_frames_its_own_loop_agrees(setup):
    pipe, inputs = setup
    upstream_latents = rollout(pipe, inputs)  # upstream re-encodes the whole selection every chunk
    with adapter.install(pipe, "fp32"):
        ours = rollout(pipe, inputs)
    # chunk 0 reads no memory and chunk 1 reads frames 0-3, encoded alone by both; from chunk 2 on
    # upstream re-encodes the older frames together with the newer ones
    assert close(upstream_latents[:, :, :8], ours[:, :, :8])
    assert not close(upstream_latents[:, :, 8:], ours[:, :, 8:], 1e-3)


def test_qvg_stays_close_and_stores_less(setup, reference):
    pipe, inputs = setup
    with adapter.install(pipe, qkv.build_policy("qvg", clusters=4, block=16)) as handle:
        ours = rollout(pipe, inputs)
        compressed = handle.memory().compressed
    drift = [float((ours[:, :, c : c + 4] - reference[:, :, c : c + 4]).norm() / reference[:, :, c : c + 4].norm())
             for c in range(0, FRAMES, 4)]
    assert drift[0] < 1e-6  # chunk 0 reads no stored frame (fp32 rounding: the merge)
    # 4 clusters, blocks of 16, 16-token clips: chunks 1-7 measured 0.20% ... 3.05% (all: 1.26%); every
    # chunk's latents feed the later chunks' memory, so the drift compounds. The PRoPE stream is
    # stored before its camera projection: stored projected, its error grew with the camera's
    # distance from the origin (chunk 7: 16%, all: 6.3%)
    assert 0 < max(drift[1:4]) < 0.01
    assert max(drift) < 0.05 and float((ours - reference).norm() / reference.norm()) < 0.025
    fp32 = 2 * 2 * (FRAMES - 4) * TOKENS * 2 * 2 * HEADS * HEAD_DIM * 4  # branches, blocks, tokens, streams, K+V
    assert 0 < compressed * 2 < fp32


def test_frames_per_span_reset_and_a_second_video(setup, reference):
    pipe, inputs = setup
    with adapter.install(pipe, "fp32", frames_per_span=1) as handle:
        first = rollout(pipe, inputs)
        assert len(handle.stores[1].cache.layer(1).spans) == FRAMES - 4  # a span per frame
        second = rollout(pipe, inputs)  # a new video: the stores start over
        assert torch.equal(first, second) and close(reference, first)
        handle.reset()
        assert handle.memory().compressed == 0


def test_prope_keys_start_warm_only_where_the_clusters_fit():
    """A clip's PRoPE keys are clustered from the previous clip's centroids, unless the clip is
    too short for as many clusters (then cold, as a cache span is)."""
    store = adapter.FrameStore(KVCache(qkv.build_policy("qvg", clusters=8, block=16), num_layers=1, span_chunks=1),
                               frames_per_span=4)
    clips = store.begin([0, 1, 2, 3, 4, 6], [0, 1, 2, 3, 4, 5])
    assert clips == [(0, 1, 2, 3), (4,), (6,)]
    k = torch.randn(1, 2, 6 * TOKENS, HEAD_DIM)
    store.append(0, clips, k, k, k + 1)  # 16 tokens, then 4 (fewer than 8 clusters), then 4
    assert [ct.stages[0].centroids.shape[2] for ct in store.prope_keys[0]] == [8, 4, 4]


def test_the_store_reads_clips_whole():
    store = adapter.FrameStore(KVCache("fp32", num_layers=1, span_chunks=1), frames_per_span=4)
    clips = store.begin([8, 9, 10, 11, 20, 21], [4, 5, 6, 7, 8, 9])
    assert clips == [(8, 9, 10, 11), (20, 21)]  # cut at 4 frames and where the frames jump
    k = torch.randn(1, 2, 6 * TOKENS, HEAD_DIM)
    store.append(0, clips, k, k, 2 * k)
    assert [sp.tokens for sp in store.cache.layer(0).spans] == [16, 8] and store.cache.layer(0).memory().reserved == 0
    assert [ct.shape[2] for ct in store.prope_keys[0]] == [16, 8]
    assert store.memory().compressed == 3 * k.numel() * 4 and store.memory().tokens == 6 * TOKENS
    assert store.reads({8: 0, 9: 1, 10: 2, 11: 3, 20: 6, 21: 7}) == [(0, 4), (1, 2)]
    with pytest.raises(CacheError, match="frames_per_span=1"):
        store.reads({8: 0, 9: 1})
    with pytest.raises(CacheError, match="not stored"):
        store.reads({12: 0})


def test_what_the_adapter_does_not_take_raises(setup):
    pipe, inputs = setup
    with adapter.install(pipe, "fp32"):
        with pytest.raises(ShapeError, match="one video at a time"):
            rollout(pipe, {**inputs, "latents": inputs["latents"].expand(2, -1, -1, -1, -1)})
    with pytest.raises(ConfigError, match="full-precision window"):
        adapter.install(pipe, "kivi")
    with pytest.raises(ConfigError, match="attention"):
        adapter.install(pipe, "fp32", attention="fused")
    with pytest.raises(ConfigError, match="HunyuanVideo_1_5_Pipeline"):
        adapter.install(pipe.transformer, "fp32")
    assert "_ar_rollout_inner" not in vars(pipe) and math.isfinite(float(rollout(pipe, inputs).sum()))
