"""HY-WorldPlay's retrieved-memory vision cache, with every frame's K/V compressed once.

HY-WorldPlay (github Tencent-Hunyuan/HY-WorldPlay) generates a camera-controlled video chunk by
chunk (``HunyuanVideo_1_5_Pipeline._ar_rollout_inner``, ``hyvideo/pipelines/worldplay_video_pipeline.py``;
4 latent frames a chunk). Before each chunk after the first it selects up to 20 earlier frames
(``select_aligned_memory_frames``, ``hyvideo/utils/retrieval_context.py``: the first 4, the 12
newest and the 4-frame clips whose cameras see most of the chunk's view), re-encodes all of them
with one pass of the double-stream blocks at timestep 14 (``forward_vision(cache_vision=True)``)
into ``kv_cache[block]["k_vision"]`` / ``["v_vision"]``, and every denoising step attends to
[text, that cache, the chunk] (``sequence_parallel_attention_vision``,
``hyvideo/models/transformers/modules/attention.py``). Each call carries two streams as batch rows:
RoPE-roped and PRoPE-projected (camera) q/k/v. RoPE time positions are packed: the selected
frames at 0..n-1 in frame order, the chunk at n..n+3. With CFG a second cache holds the negative
branch (its text differs, so its vision K/V do too).

:func:`install` replaces the pipeline's ``_ar_rollout_inner`` (on the instance) by
:meth:`WorldPlayHandle.rollout`, upstream's loop with one change: a frame's K/V are computed
once, by a pass over the selected frames not stored yet (the previous chunk) that attends to
[text, the stored selected frames, themselves] at upstream's packed positions, and kept
compressed in a :class:`FrameStore` keyed by frame index (one span per clip of
``frames_per_span`` frames, 4 by default: the retrieval's unit) for every later selection, never
re-encoded. Each double block's ``forward_vision`` is upstream's with the attention replaced:
[text (exact), the selected frames' compressed spans, the pass's own K/V (exact)].

The PRoPE stream is stored before its camera projection (upstream's ``prope_qkv`` multiplies
each token's K/V by its camera's inverse projection) and projected when a span is read, with the
cameras of the span's frames: the projection's entries grow with the camera's distance from the
world origin, and so, compressed after it, did the quantization error (on the H200 at
HunyuanVideo-1.5 sizes, a camera walking away drifted 39% from upstream by chunk 6, against 1.5%
lossless). What is stored no longer depends on where the camera is.

A stored key keeps the time position it was roped at (its rank in the selection that encoded
it). A later chunk gives it its current rank by roping the queries it meets at their position
shifted by (stored - current) rank: a RoPE score depends on the difference of the two positions
only, so every query-key pair sees upstream's packed offset. The queries thus differ per stored
clip: each span is attended to on its own (decompressed alone, as the ``"staged"`` attention
method does; never the history at once) and the parts are merged by log-sum-exp.

    handle = qkv.adapters.hy_worldplay.install(pipe, "qvg")     # a HunyuanVideo_1_5_Pipeline
    out = pipe(prompt=..., model_type="ar", viewmats=..., Ks=..., action=...)   # unchanged

Not reproduced: the joint re-encoding of the whole selection at every chunk (the point of the
store); sequence parallelism (``ConfigError``); SageAttention blocks (the attention here is exact);
a batch of several videos (upstream's AR path takes one: ``ShapeError``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import torch
from einops import repeat

from qkv import kernels
from qkv.caches.adapters.handle import AdapterHandle, pending_memory
from qkv.caches.cache_config import CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy, TensorPolicy
from qkv.compressed import CompressedTensor
from qkv.component import check_int
from qkv.errors import CacheError, ConfigError, ShapeError
from qkv.kernels.attention import sdpa_with_lse

__all__ = ["ChunkReads", "FrameStore", "WorldPlayHandle", "install"]

STABILIZATION_LEVEL = 15  # upstream encodes the context at timestep STABILIZATION_LEVEL - 1


@dataclasses.dataclass(frozen=True)
class _Video:
    """What a rollout's passes share: upstream's per-frame inputs (latents [1, C, T, H, W], their
    condition, cameras and actions [1, T, ...]), the task, the device, the timestep dtype, the
    dtype the model takes cameras in (upstream's ``target_dtype``) and the latent grid (``th`` x
    ``tw`` patches a frame)."""

    latents: torch.Tensor
    cond_latents: torch.Tensor
    viewmats: torch.Tensor
    Ks: torch.Tensor
    action: torch.Tensor
    task_type: str
    device: object
    dtype: torch.dtype
    camera_dtype: torch.dtype
    th: int
    tw: int


def _module(obj) -> types.ModuleType:
    """The module that defines ``obj``'s class: the functions upstream's own code calls there."""
    return sys.modules[type(obj).__module__]


class FrameStore:
    """Compressed K/V of video frames for every double block, keyed by frame index.

    ``cache`` has a layer per block and a span per clip (consecutive frames, at most
    ``frames_per_span``, stored by one pass; compressed once, when stored): the RoPE stream's
    roped keys and the values [B, H, tokens, D]. ``prope_keys[block][s]``: span s's PRoPE keys
    before their camera projection, compressed by the cache's policy for keys (the PRoPE stream's
    values before the projection are the values: stored once). ``clips[s]``: the frames of span
    s; ``positions[f]``: the RoPE time position frame f's keys were roped at."""

    def __init__(self, cache: KVCache, frames_per_span: int) -> None:
        self.cache, self.frames_per_span = cache, frames_per_span
        self.reset()

    def reset(self) -> None:
        self.cache.reset()
        self.clips: list[tuple[int, ...]] = []
        self.span_of: dict[int, int] = {}
        self.positions: dict[int, int] = {}
        self.prope_keys: dict[int, list[CompressedTensor]] = {}

    def memory(self) -> CacheMemory:
        """The cache's bytes plus the PRoPE keys' (their elements counted; their tokens are the
        cache's)."""
        mem = self.cache.memory()
        for cts in self.prope_keys.values():
            for ct in cts:
                mem = mem + CacheMemory(compressed=ct.nbytes, elements=math.prod(ct.shape))
        return mem

    def begin(self, frames: list[int], positions: list[int]) -> list[tuple[int, ...]]:
        """Register ``frames`` (one pass, roped at ``positions``) as new clips; returns them."""
        clips: list[list[int]] = []
        for f in frames:
            if not clips or len(clips[-1]) == self.frames_per_span or f != clips[-1][-1] + 1:
                clips.append([])
            clips[-1].append(f)
        for clip in clips:
            for f in clip:
                self.span_of[f] = len(self.clips)
            self.clips.append(tuple(clip))
        self.positions.update(zip(frames, positions))
        return [tuple(c) for c in clips]

    def append(self, block: int, clips: list[tuple[int, ...]], k: torch.Tensor, v: torch.Tensor,
               k_prope: torch.Tensor) -> None:
        """Block ``block``'s RoPE keys, values and PRoPE keys before the projection [B, H, tokens, D]
        of the frames of ``clips``, a span per clip. The PRoPE keys' values are not read back:
        they come from the same pass as the keys the cache checks (``validate``)."""
        layer = self.cache.layer(block)
        cfg = self.cache.config
        tp = cfg.span_policy.k
        keys = self.prope_keys.setdefault(block, [])
        per_frame = k.shape[2] // sum(len(c) for c in clips)
        at = 0
        for clip in clips:
            n = len(clip) * per_frame
            x = k_prope[:, :, at : at + n]
            warm = keys[-1] if keys and cfg.warm_start and tp.fits_warm_start(keys[-1], x.shape) else None
            ct = tp.compress(x, warm_start=warm, backend=cfg.backend, name=f"block {block}: PRoPE keys", validate=False)
            layer.append(k[:, :, at : at + n], v[:, :, at : at + n])
            keys.append(ct)  # once the layer took the clip: a span and its PRoPE keys, or neither
            at += n
        layer.trim()  # spans are compressed at once: no tail buffer kept

    def clip(self, block: int, span: int, project) -> "_StoredClip":
        """Stored span ``span`` of block ``block`` as :func:`_attend_each` reads it, its PRoPE
        stream projected by ``project(k, v)``."""
        layer = self.cache.layer(block)
        layer.settle(wait=False)  # a clip whose value check failed is not read as if it were fine
        return _StoredClip(layer.spans[span], self.prope_keys[block][span], self.cache.config.span_policy.k, project)

    def reads(self, rank: dict[int, int]) -> list[tuple[int, int]]:
        """(span, RoPE shift) of every stored clip among the frames ``rank`` maps to their
        position in the current selection; a clip is read whole or not at all."""
        unknown = [f for f in rank if f not in self.span_of]
        if unknown:
            raise CacheError(f"hy_worldplay: frames {unknown} are selected but not stored")
        out = []
        for s in sorted({self.span_of[f] for f in rank}):
            clip = self.clips[s]
            missing = [f for f in clip if f not in rank]
            if missing:
                raise CacheError(f"hy_worldplay: frames {missing} of the stored clip {list(clip)} are not selected; "
                                 "store smaller clips (frames_per_span=1)")
            out.append((s, self.positions[clip[0]] - rank[clip[0]]))
        return out


@dataclasses.dataclass(frozen=True)
class _StoredClip:
    """A stored clip as an attention segment of both streams: ``materialize`` decompresses the
    span (RoPE keys, values) and the PRoPE keys, projects the PRoPE keys and the values by
    ``project(k, v)`` and returns [RoPE stream; PRoPE stream] K/V [2B, H, S, D]."""

    span: kernels.CompressedSpan
    prope_keys: CompressedTensor
    policy: TensorPolicy
    project: object

    def materialize(self, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.span.materialize(backend)
        k_prope, v_prope = self.project(self.policy.decompress(self.prope_keys, backend=backend), v)
        return torch.cat([k, k_prope]), torch.cat([v, v_prope])


@torch.compiler.disable
def _attend_each(parts: list, backend: str) -> torch.Tensor:
    """softmax attention over the keys of every (q [B, H, S, D], segment) of ``parts`` together,
    each segment with its own queries (the same rows and heads): one segment decompressed at a
    time, the partial results merged by log-sum-exp. [B, H, S, D] fp32."""
    state = None
    for q, seg in parts:
        k, v = seg.materialize(backend)
        state = kernels.merge_partials(state, sdpa_with_lse(q, k, v, 1 / math.sqrt(q.shape[-1])), backend=backend)
        del k, v
    return state[0]


class ChunkReads:
    """One pass of the double blocks, given to them as ``kv_cache``: block i's text K/V
    (``text[i]``, upstream's dicts: what the model's own bookkeeping reads), the stored spans the
    pass reads with their RoPE shifts, the pass's RoPE grid (its ``frames`` frames from time
    position ``first``, ``th`` x ``tw`` patches) and, for a storing pass, the clips its K/V go to."""

    def __init__(self, store: FrameStore, text: list[dict], memory: list[tuple[int, int]], model, first: int,
                 frames: int, video: _Video, clips: list[tuple[int, ...]] | None = None) -> None:
        self.store, self.text, self.memory, self.model = store, text, memory, model
        self.first, self.frames, self.video, self.clips = first, frames, video, clips
        self._freqs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cameras: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, index: int) -> dict:
        return self.text[index]

    def freqs(self, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [frames * th * tw, D] of the pass's tokens at time positions shifted by
        ``shift``: the model's own table (``get_rotary_pos_embed``), from another start."""
        if shift not in self._freqs:
            start = self.first + shift
            self._freqs[shift] = _module(self.model).get_nd_rotary_pos_embed(
                self.model.rope_dim_list, (start, 0, 0), (start + self.frames, self.video.th, self.video.tw),
                theta=self.model.rope_theta, use_real=True, theta_rescale_factor=1)
        return self._freqs[shift]

    def projection(self, span: int):
        """``project(k, v)`` for stored span ``span``: its PRoPE keys and values [B, H, S, D],
        stored before the projection, projected by upstream's ``prope_qkv`` with the cameras of
        the span's frames, as the pass that stored them projected its own."""
        if span not in self._cameras:
            # a camera per frame, where the model repeats it for every token: prope_qkv applies
            # it to the frame's tokens alike (the same products, batched over frames, not tokens)
            video, clip = self.video, list(self.store.clips[span])
            self._cameras[span] = tuple(x[:, clip].to(video.device).to(video.camera_dtype)
                                        for x in (video.viewmats, video.Ks))
        viewmats, ks = self._cameras[span]

        def project(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # prope_qkv projects a query too (of the keys' shape, which it asserts): discarded
            _, k_prope, v_prope, _ = _module(self.model).prope_qkv(k, k, v, viewmats=viewmats, Ks=ks)
            return k_prope, v_prope

        return project

    def attend(self, index: int, img_q, img_k, q, k, v, q_prope, k_prope, v_prope, store: bool):
        """``sequence_parallel_attention_vision`` for block ``index`` over [text, stored spans,
        own K/V]: q, k, v [B, S, H, D] roped (``img_q``, ``img_k`` before RoPE), the PRoPE ones
        [B, H, S, D]; ``store``: keep the own K/V in the store (roped keys, values, and the PRoPE
        keys before their projection: ``img_k``). Returns (RoPE, PRoPE) outputs, [B, S, H * D] each."""
        query, key, value = (torch.cat([a.transpose(1, 2), b], 0)  # [RoPE stream; PRoPE stream]
                             for a, b in ((q, q_prope), (k, k_prope), (v, v_prope)))
        b = q.shape[0]
        if store:
            self.store.append(index, self.clips, key[:b], value[:b], img_k.transpose(1, 2))
        text = self.text[index]
        text_k, text_v = (repeat(text[name], "B H S D->(B R) H S D", R=2) for name in ("k_txt", "v_txt"))
        parts = [(query, kernels.DenseKV(text_k, text_v)), (query, kernels.DenseKV(key, value))]
        shifted = {0: query}
        for span, shift in self.memory:
            if shift not in shifted:
                moved = _module(self.model).apply_rotary_emb(img_q, img_q, self.freqs(shift), head_first=False)[0]
                shifted[shift] = torch.cat([moved.transpose(1, 2), query[b:]], 0)
            parts.append((shifted[shift], self.store.clip(index, span, self.projection(span))))
        out = _attend_each(parts, self.store.cache.config.backend).to(query.dtype)
        out = out.transpose(1, 2).flatten(2)  # [2B, S, H * D]
        return out[:b], out[b:]


def _forward_vision(original):
    """``MMDoubleStreamBlock.forward_vision`` with the attention over a :class:`ChunkReads`."""

    def forward_vision(self, img, vec, freqs_cis=None, attn_param=None, block_idx=None, viewmats=None, Ks=None,
                       kv_cache=None, cache_vision=False):
        if not isinstance(kv_cache, ChunkReads):  # upstream's own dicts: upstream's own forward
            return original(img, vec, freqs_cis, attn_param, block_idx, viewmats, Ks, kv_cache, cache_vision)
        up = _module(self)
        img_q, img_k, img_v, gate1, shift2, scale2, gate2 = self.modulate_img(vec, img)
        q_prope, k_prope, v_prope, apply_fn_o = up.prope_qkv(
            img_q.permute(0, 2, 1, 3), img_k.permute(0, 2, 1, 3), img_v.permute(0, 2, 1, 3), viewmats=viewmats, Ks=Ks)
        q, k = up.apply_rotary_emb(img_q, img_k, freqs_cis, head_first=False)
        img_attn, img_attn_prope = kv_cache.attend(block_idx, img_q, img_k, q, k, img_v, q_prope, k_prope, v_prope,
                                                   store=cache_vision)
        img_attn_prope = img_attn_prope.unflatten(2, (self.heads_num, -1)).transpose(1, 2)  # B L (H D) -> B H L D
        img_attn_prope = apply_fn_o(img_attn_prope).transpose(1, 2).flatten(2)
        img = img + up.apply_gate(self.img_attn_proj(img_attn) + self.img_attn_prope_proj(img_attn_prope), gate=gate1)
        img = img + up.apply_gate(self.img_mlp(up.modulate(self.img_norm2(img), shift=shift2, scale=scale2)),
                                  gate=gate2)
        return img, {"k_vision": None, "v_vision": None}

    return forward_vision


class WorldPlayHandle(AdapterHandle):
    """:class:`AdapterHandle` of a HY-WorldPlay pipeline: ``stores`` (the positive branch's
    :class:`FrameStore`, then the negative's, used with CFG); ``cache`` is the positive one's."""

    def __init__(self, pipeline, policy: Policy | str, cache_options: dict, frames_per_span: int) -> None:
        super().__init__("hy_worldplay", policy, cache_options,
                         fixed=("num_layers", "max_spans", "sink_chunks", "recent_chunks", "span_chunks", "span_tokens",
                                "attention"))
        check_int("hy_worldplay", "frames_per_span", frames_per_span, 1)
        self.pipeline, self.model = pipeline, pipeline.transformer
        blocks = len(self.model.double_blocks)
        self.stores = [FrameStore(KVCache(policy, num_layers=blocks, span_chunks=1, **cache_options), frames_per_span)
                       for _ in range(2)]
        if self.stores[0].cache.config.fp_window:
            raise ConfigError("hy_worldplay: a policy with a full-precision window (kivi) does not fit a store of "
                              "frames read in any order; use one without window()")
        self.cache = self.stores[0].cache

    def caches(self) -> list[KVCache]:
        return [] if self.removed else [s.cache for s in self.stores]

    def memory(self) -> CacheMemory:
        """Both stores (their caches and PRoPE keys) plus the text K/V upstream's dicts hold."""
        held = CacheMemory()
        for store in [] if self.removed else self.stores:
            held = held + store.memory()
        return held + pending_memory(self.pending())

    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The text K/V upstream's dicts hold (exact)."""
        if self.removed:
            return []
        dicts = [d for name in ("_kv_cache", "_kv_cache_neg") for d in getattr(self.pipeline, name, None) or []]
        return [(d["k_txt"], d["v_txt"]) for d in dicts if d["k_txt"] is not None]

    def reset(self) -> None:
        for store in self.stores:
            store.reset()

    def _autocast(self):
        pipe = self.pipeline
        return torch.autocast(device_type="cuda", dtype=pipe.target_dtype, enabled=pipe.autocast_enabled)

    def _offload(self):
        pipe = self.pipeline
        return _module(pipe).auto_offload_model(self.model, pipe.execution_device, enabled=pipe.enable_offloading)

    def _select(self, viewmats: torch.Tensor, current: int, device) -> list[int]:
        """Upstream's selection for the chunk starting at frame ``current``: sorted, the chunk excluded."""
        pipe, selected = self.pipeline, []
        for chunk_start_idx in range(current, current + pipe.chunk_latent_frames, 4):
            selected += _module(pipe).select_aligned_memory_frames(
                viewmats[0].cpu().detach().numpy(), chunk_start_idx, memory_frames=20, temporal_context_size=12,
                pred_latent_size=4, points_local=pipe.points_local, device=device)
        chunk = range(current, current + pipe.chunk_latent_frames)
        return [f for f in sorted(set(selected)) if f not in chunk]

    def _encode(self, store: FrameStore, text: list[dict], selected: list[int], video: _Video) -> None:
        """Store the selected frames ``store`` lacks: a pass per run of consecutive ranks, each
        attending to the stored selected frames and itself, at timestep 14."""
        pipe, model = self.pipeline, self.model
        rank = {f: r for r, f in enumerate(selected)}
        new = [f for f in selected if f not in store.positions]
        runs: list[list[int]] = []
        for f in new:
            if not runs or rank[f] != rank[runs[-1][-1]] + 1:
                runs.append([])
            runs[-1].append(f)
        for run in runs:
            first = rank[run[0]]
            memory = store.reads({f: r for f, r in rank.items() if f in store.positions})
            reads = ChunkReads(store, text, memory, model, first, len(run), video,
                               clips=store.begin(run, [rank[f] for f in run]))
            latents, cond = video.latents[:, :, run], video.cond_latents[:, :, run]
            with self._autocast(), self._offload():
                model(bi_inference=False, ar_txt_inference=False, ar_vision_inference=True,
                      hidden_states=torch.concat([latents, cond], dim=1),
                      timestep=torch.full((len(run),), STABILIZATION_LEVEL - 1, device=video.device, dtype=video.dtype),
                      timestep_r=None, mask_type=video.task_type, return_dict=False,
                      viewmats=video.viewmats[:, run].to(video.device).to(pipe.target_dtype),
                      Ks=video.Ks[:, run].to(video.device).to(pipe.target_dtype),
                      action=video.action[:, run].to(video.device).to(pipe.target_dtype),
                      kv_cache=reads, cache_vision=True, rope_temporal_size=first + len(run),
                      start_rope_start_idx=first)

    def rollout(self, latents, timesteps, prompt_embeds, prompt_mask, vision_states, cond_latents, task_type,
                extra_kwargs, viewmats, Ks, action, device):
        """``_ar_rollout_inner`` on the frame stores (module docstring); returns the latents."""
        self.check_installed()
        pipe, model = self.pipeline, self.model
        if latents.shape[0] != 1:
            raise ShapeError(f"hy_worldplay: the AR rollout generates one video at a time (upstream's forward_vision "
                             f"takes one row of per-frame timesteps), got a batch of {latents.shape[0]}")
        if _module(model).get_parallel_state().sp_enabled:
            raise ConfigError("hy_worldplay: sequence parallelism is not supported by this adapter")
        pipe.init_kv_cache()
        self.reset()
        cfg = pipe.do_classifier_free_guidance
        rows = [1, 0] if cfg else [0]  # the positive branch first, then the negative (CFG)
        byt5 = ("byt5_text_states", "byt5_text_mask")
        texts = []
        with self._autocast(), self._offload():
            for row, kv in zip(rows, (pipe._kv_cache, pipe._kv_cache_neg)):
                texts.append(model(
                    bi_inference=False, ar_txt_inference=True, ar_vision_inference=False,
                    timestep_txt=torch.tensor([0]).to(device).to(latents.dtype),
                    text_states=prompt_embeds[row, None, ...], encoder_attention_mask=prompt_mask[row, None, ...],
                    vision_states=vision_states[row, None, ...], mask_type=task_type,
                    extra_kwargs={key: extra_kwargs[key][row, None, ...] for key in byt5},
                    kv_cache=kv, cache_txt=True))
        pipe._kv_cache = texts[0]
        if cfg:
            pipe._kv_cache_neg = texts[1]
        n = pipe.chunk_latent_frames
        th, tw = latents.shape[3] // model.patch_size[1], latents.shape[4] // model.patch_size[2]
        video = _Video(latents, cond_latents, viewmats, Ks, action, task_type, device, timesteps.dtype,
                       pipe.target_dtype, th, tw)
        for chunk_i in range(pipe.chunk_num):
            selected = []
            if chunk_i > 0:
                selected = self._select(viewmats, chunk_i * n, device)
                for store, text in zip(self.stores, texts):
                    self._encode(store, text, selected, video)
                pipe.scheduler.set_timesteps(pipe.num_inference_steps, device=device)
            rank = {f: r for r, f in enumerate(selected)}
            reads = [ChunkReads(store, text, store.reads(rank), model, len(selected), n, video)
                     for store, text in zip(self.stores, texts)]
            start_idx, end_idx = chunk_i * n, chunk_i * n + n
            with pipe.progress_bar(total=pipe.num_inference_steps) as progress_bar, self._offload():
                for i, t in enumerate(timesteps):
                    timestep_input = torch.full((n,), t, device=device, dtype=timesteps.dtype)
                    latent_model_input = latents[:, :, start_idx:end_idx]
                    latents_concat = torch.concat([latent_model_input, cond_latents[:, :, start_idx:end_idx]], dim=1)
                    latents_concat = pipe.scheduler.scale_model_input(latents_concat, t)
                    with self._autocast():
                        preds = [model(
                            bi_inference=False, ar_txt_inference=False, ar_vision_inference=True,
                            hidden_states=latents_concat, timestep=timestep_input, timestep_r=None, mask_type=task_type,
                            return_dict=False, viewmats=viewmats[:, start_idx:end_idx].to(device).to(pipe.target_dtype),
                            Ks=Ks[:, start_idx:end_idx].to(device).to(pipe.target_dtype),
                            action=action[:, start_idx:end_idx].to(device).to(pipe.target_dtype),
                            kv_cache=r, cache_vision=False, rope_temporal_size=latents_concat.shape[2] + len(selected),
                            start_rope_start_idx=len(selected))[0] for r in reads]
                    noise_pred = preds[0]
                    if cfg:
                        noise_pred = preds[1] + pipe.guidance_scale * (preds[0] - preds[1])
                    latent_model_input = pipe.scheduler.step(noise_pred, t, latent_model_input, return_dict=False)[0]
                    latents[:, :, start_idx:end_idx] = latent_model_input[:, :, -n:]
                    warm = (i + 1) > pipe.num_warmup_steps and (i + 1) % pipe.scheduler.order == 0
                    if (i == len(timesteps) - 1 or warm) and progress_bar is not None:
                        progress_bar.update()
        return latents


def install(target, policy: Policy | str = "qvg", *, frames_per_span: int = 4, **cache_options) -> WorldPlayHandle:
    """Run ``target`` (a HY-WorldPlay ``HunyuanVideo_1_5_Pipeline``) with each frame's K/V stored
    compressed once. ``policy``: a :class:`Policy` or preset/spec (without a full-precision
    window); ``frames_per_span``: frames per compressed span (a selection must take a span whole);
    ``cache_options``: :class:`~qkv.KVCache` options (``warm_start``, ``backend``, ...; not those
    the store decides: ``num_layers``, ``span_chunks``, ``span_tokens``, ``sink_chunks``,
    ``recent_chunks``, ``max_spans``, ``attention``). Returns the handle (``memory()``,
    ``reset()``, ``remove()``)."""
    model = getattr(target, "transformer", None)
    if model is None or not hasattr(model, "double_blocks") or not hasattr(target, "_ar_rollout_inner"):
        raise ConfigError(f"hy_worldplay: expected a HunyuanVideo_1_5_Pipeline (with .transformer and its AR "
                          f"rollout), got {type(target).__name__}")
    handle = WorldPlayHandle(target, policy, cache_options, frames_per_span)
    handle.patches.set(target, "_ar_rollout_inner", handle.rollout)
    for block in model.double_blocks:
        handle.patches.set(block, "forward_vision", types.MethodType(_forward_vision(block.forward_vision), block))
    return handle
