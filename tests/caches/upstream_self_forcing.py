"""Self-Forcing's inference path (github guandeh17/Self-Forcing), restated: the repository is not
pip-installable, and its adapter (``qkv.adapters.self_forcing``) is tested and benchmarked
against this. Each piece names the upstream file it restates; only the inference branches are
kept (no training, flex attention, image-to-video, text encoder or VAE: the pipeline takes the
text encoder's output and returns latents).

Wan2.1's base modules (norms, cross-attention with its cache, RoPE tables, the attention function)
come from streamdiffusionv2's copy of them (``models.wan.wan_base``; ``pip install --no-deps
streamdiffusionv2``), which equals Self-Forcing's ``wan/modules/model.py`` and ``attention.py``
in every class the inference path uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from models.wan.wan_base.modules.attention import attention
from models.wan.wan_base.modules.model import (
    WAN_CROSSATTENTION_CLASSES,
    WanLayerNorm,
    WanRMSNorm,
    rope_params,
    sinusoidal_embedding_1d,
)

# -- wan/modules/causal_model.py ------------------------------------------------------------------


def causal_rope_apply(x, grid_sizes, freqs, start_frame=0):
    n, c = x.size(2), x.size(3) // 2
    freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    output = []
    for i, (f, h, w) in enumerate(grid_sizes.tolist()):
        seq_len = f * h * w
        x_i = torch.view_as_complex(x[i, :seq_len].to(torch.float64).reshape(seq_len, n, -1, 2))
        freqs_i = torch.cat([
            freqs[0][start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
            freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(seq_len, 1, -1)
        x_i = torch.view_as_real(x_i * freqs_i).flatten(2)
        x_i = torch.cat([x_i, x[i, seq_len:]])
        output.append(x_i)
    return torch.stack(output).type_as(x)


class CausalWanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, local_attn_size=-1, sink_size=0, qk_norm=True, eps=1e-6):
        assert dim % num_heads == 0
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.qk_norm = qk_norm
        self.eps = eps
        self.max_attention_size = 32760 if local_attn_size == -1 else local_attn_size * 1560
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x, seq_lens, grid_sizes, freqs, block_mask, kv_cache=None, current_start=0, cache_start=None):
        assert kv_cache is not None, "only the cache branch is restated"
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, s, n, d)
        k = self.norm_k(self.k(x)).view(b, s, n, d)
        v = self.v(x).view(b, s, n, d)
        frame_seqlen = math.prod(grid_sizes[0][1:]).item()
        current_start_frame = current_start // frame_seqlen
        roped_query = causal_rope_apply(q, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)
        roped_key = causal_rope_apply(k, grid_sizes, freqs, start_frame=current_start_frame).type_as(v)
        current_end = current_start + roped_query.shape[1]
        sink_tokens = self.sink_size * frame_seqlen
        kv_cache_size = kv_cache["k"].shape[1]
        num_new_tokens = roped_query.shape[1]
        if self.local_attn_size != -1 and (current_end > kv_cache["global_end_index"].item()) and (
                num_new_tokens + kv_cache["local_end_index"].item() > kv_cache_size):
            num_evicted_tokens = num_new_tokens + kv_cache["local_end_index"].item() - kv_cache_size
            num_rolled_tokens = kv_cache["local_end_index"].item() - num_evicted_tokens - sink_tokens
            kv_cache["k"][:, sink_tokens:sink_tokens + num_rolled_tokens] = \
                kv_cache["k"][:, sink_tokens + num_evicted_tokens:sink_tokens + num_evicted_tokens + num_rolled_tokens].clone()
            kv_cache["v"][:, sink_tokens:sink_tokens + num_rolled_tokens] = \
                kv_cache["v"][:, sink_tokens + num_evicted_tokens:sink_tokens + num_evicted_tokens + num_rolled_tokens].clone()
            local_end_index = kv_cache["local_end_index"].item() + current_end - \
                kv_cache["global_end_index"].item() - num_evicted_tokens
            local_start_index = local_end_index - num_new_tokens
            kv_cache["k"][:, local_start_index:local_end_index] = roped_key
            kv_cache["v"][:, local_start_index:local_end_index] = v
        else:
            local_end_index = kv_cache["local_end_index"].item() + current_end - kv_cache["global_end_index"].item()
            local_start_index = local_end_index - num_new_tokens
            kv_cache["k"][:, local_start_index:local_end_index] = roped_key
            kv_cache["v"][:, local_start_index:local_end_index] = v
        x = attention(
            roped_query,
            kv_cache["k"][:, max(0, local_end_index - self.max_attention_size):local_end_index],
            kv_cache["v"][:, max(0, local_end_index - self.max_attention_size):local_end_index],
        )
        kv_cache["global_end_index"].fill_(current_end)
        kv_cache["local_end_index"].fill_(local_end_index)
        return self.o(x.flatten(2))


class CausalWanAttentionBlock(nn.Module):
    def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, local_attn_size=-1, sink_size=0, qk_norm=True,
                 cross_attn_norm=False, eps=1e-6):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.local_attn_size = local_attn_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = CausalWanSelfAttention(dim, num_heads, local_attn_size, sink_size, qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WAN_CROSSATTENTION_CLASSES[cross_attn_type](dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x, e, seq_lens, grid_sizes, freqs, context, context_lens, block_mask, kv_cache=None,
                crossattn_cache=None, current_start=0, cache_start=None):
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)
        y = self.self_attn(
            (self.norm1(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[1]) + e[0]).flatten(1, 2),
            seq_lens, grid_sizes, freqs, block_mask, kv_cache, current_start, cache_start)
        x = x + (y.unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * e[2]).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), context, context_lens, crossattn_cache=crossattn_cache)
        y = self.ffn((self.norm2(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[4]) + e[3]).flatten(1, 2))
        return x + (y.unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * e[5]).flatten(1, 2)


class CausalHead(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.dim, self.out_dim, self.patch_size, self.eps = dim, out_dim, patch_size, eps
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x, e):
        num_frames, frame_seqlen = e.shape[1], x.shape[1] // e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(dim=1, sizes=(num_frames, frame_seqlen)) * (1 + e[1]) + e[0])


class CausalWanModel(nn.Module):
    """Upstream's ``CausalWanModel`` (a diffusers ``ModelMixin`` there), text-to-video."""

    def __init__(self, patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048, ffn_dim=8192, freq_dim=256,
                 text_dim=4096, out_dim=16, num_heads=16, num_layers=32, local_attn_size=-1, sink_size=0,
                 qk_norm=True, cross_attn_norm=True, eps=1e-6):
        super().__init__()
        self.model_type = "t2v"
        self.patch_size, self.text_len, self.in_dim, self.dim = patch_size, text_len, in_dim, dim
        self.ffn_dim, self.freq_dim, self.text_dim, self.out_dim = ffn_dim, freq_dim, text_dim, out_dim
        self.num_heads, self.num_layers, self.local_attn_size = num_heads, num_layers, local_attn_size
        self.qk_norm, self.cross_attn_norm, self.eps = qk_norm, cross_attn_norm, eps
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([
            CausalWanAttentionBlock("t2v_cross_attn", dim, ffn_dim, num_heads, local_attn_size, sink_size, qk_norm,
                                    cross_attn_norm, eps)
            for _ in range(num_layers)
        ])
        self.head = CausalHead(dim, out_dim, patch_size, eps)
        assert (dim % num_heads) == 0 and (dim // num_heads) % 2 == 0
        d = dim // num_heads
        self.freqs = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                                rope_params(1024, 2 * (d // 6))], dim=1)
        self.init_weights()
        self.block_mask = None
        self.num_frame_per_block = 1

    def forward(self, x, t, context, seq_len, kv_cache=None, crossattn_cache=None, current_start=0, cache_start=0):
        assert kv_cache is not None, "only _forward_inference is restated"
        device = self.patch_embedding.weight.device
        if self.freqs.device != device:
            self.freqs = self.freqs.to(device)
        x = [self.patch_embedding(u.unsqueeze(0)) for u in x]
        grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])
        x = [u.flatten(2).transpose(1, 2) for u in x]
        seq_lens = torch.tensor([u.size(1) for u in x], dtype=torch.long)
        assert seq_lens.max() <= seq_len
        x = torch.cat(x)
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).type_as(x))
        e0 = self.time_projection(e).unflatten(1, (6, self.dim)).unflatten(dim=0, sizes=t.shape)
        context = self.text_embedding(
            torch.stack([torch.cat([u, u.new_zeros(self.text_len - u.size(0), u.size(1))]) for u in context]))
        kwargs = dict(e=e0, seq_lens=seq_lens, grid_sizes=grid_sizes, freqs=self.freqs, context=context,
                      context_lens=None, block_mask=self.block_mask)
        for block_index, block in enumerate(self.blocks):
            kwargs.update({"kv_cache": kv_cache[block_index], "crossattn_cache": crossattn_cache[block_index],
                           "current_start": current_start, "cache_start": cache_start})
            x = block(x, **kwargs)
        x = self.head(x, e.unflatten(dim=0, sizes=t.shape).unsqueeze(2))
        return torch.stack(self.unpatchify(x, grid_sizes))

    def unpatchify(self, x, grid_sizes):
        c = self.out_dim
        out = []
        for u, v in zip(x, grid_sizes.tolist()):
            u = u[:math.prod(v)].view(*v, *self.patch_size, c)
            u = torch.einsum("fhwpqrc->cfphqwr", u)
            out.append(u.reshape(c, *[i * j for i, j in zip(v, self.patch_size)]))
        return out

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in self.text_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=.02)
        for m in self.time_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=.02)
        nn.init.zeros_(self.head.head.weight)


# -- utils/scheduler.py ----------------------------------------------------------------------------


class FlowMatchScheduler:
    def __init__(self, num_inference_steps=100, num_train_timesteps=1000, shift=3.0, sigma_max=1.0,
                 sigma_min=0.003 / 1.002, extra_one_step=False):
        self.num_train_timesteps, self.shift = num_train_timesteps, shift
        self.sigma_max, self.sigma_min, self.extra_one_step = sigma_max, sigma_min, extra_one_step
        self.set_timesteps(num_inference_steps)

    def set_timesteps(self, num_inference_steps=100, denoising_strength=1.0):
        sigma_start = self.sigma_min + (self.sigma_max - self.sigma_min) * denoising_strength
        if self.extra_one_step:
            self.sigmas = torch.linspace(sigma_start, self.sigma_min, num_inference_steps + 1)[:-1]
        else:
            self.sigmas = torch.linspace(sigma_start, self.sigma_min, num_inference_steps)
        self.sigmas = self.shift * self.sigmas / (1 + (self.shift - 1) * self.sigmas)
        self.timesteps = self.sigmas * self.num_train_timesteps

    def add_noise(self, original_samples, noise, timestep):
        if timestep.ndim == 2:
            timestep = timestep.flatten(0, 1)
        self.sigmas = self.sigmas.to(noise.device)
        self.timesteps = self.timesteps.to(noise.device)
        timestep_id = torch.argmin((self.timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
        sigma = self.sigmas[timestep_id].reshape(-1, 1, 1, 1)
        return ((1 - sigma) * original_samples + sigma * noise).type_as(noise)


# -- utils/wan_wrapper.py --------------------------------------------------------------------------


class WanDiffusionWrapper(nn.Module):
    """Upstream's causal wrapper around a given model (upstream loads the pretrained one)."""

    def __init__(self, model: CausalWanModel, timestep_shift=8.0):
        super().__init__()
        self.model = model.eval()
        self.uniform_timestep = False
        self.scheduler = FlowMatchScheduler(shift=timestep_shift, sigma_min=0.0, extra_one_step=True)
        self.scheduler.set_timesteps(1000)
        self.seq_len = 32760

    def get_scheduler(self):
        return self.scheduler

    def _convert_flow_pred_to_x0(self, flow_pred, xt, timestep):
        original_dtype = flow_pred.dtype
        flow_pred, xt, sigmas, timesteps = (t.double().to(flow_pred.device)
                                            for t in (flow_pred, xt, self.scheduler.sigmas, self.scheduler.timesteps))
        timestep_id = torch.argmin((timesteps.unsqueeze(0) - timestep.unsqueeze(1)).abs(), dim=1)
        sigma_t = sigmas[timestep_id].reshape(-1, 1, 1, 1)
        return (xt - sigma_t * flow_pred).to(original_dtype)

    def forward(self, noisy_image_or_video, conditional_dict, timestep, kv_cache=None, crossattn_cache=None,
                current_start=None, cache_start=None):
        flow_pred = self.model(
            noisy_image_or_video.permute(0, 2, 1, 3, 4), t=timestep, context=conditional_dict["prompt_embeds"],
            seq_len=self.seq_len, kv_cache=kv_cache, crossattn_cache=crossattn_cache, current_start=current_start,
            cache_start=cache_start,
        ).permute(0, 2, 1, 3, 4)
        pred_x0 = self._convert_flow_pred_to_x0(flow_pred.flatten(0, 1), noisy_image_or_video.flatten(0, 1),
                                                timestep.flatten(0, 1)).unflatten(0, flow_pred.shape[:2])
        return flow_pred, pred_x0


# -- pipeline/causal_inference.py ------------------------------------------------------------------


class CausalInferencePipeline(nn.Module):
    """Upstream's pipeline without the text encoder and VAE: ``inference`` takes the encoded
    prompt (``conditional_dict``) and returns the latents; ``chunk_done(latents)``, if set, is
    called after each chunk's context pass (a hook for timing). Upstream's literals for the
    cache shapes (Wan2.1-1.3B's 12 heads x 128, 32,760 tokens, 512 text tokens) are the class
    attributes below, so that a toy model can run; ``num_transformer_blocks`` (30) and
    ``frame_seq_length`` (1,560) are attributes upstream too."""

    KV_HEADS, KV_HEAD_DIM, KV_TOKENS, TEXT_TOKENS = 12, 128, 32760, 512

    def __init__(self, generator: WanDiffusionWrapper, denoising_step_list=(1000, 750, 500, 250),
                 num_frame_per_block=3, context_noise=0):
        super().__init__()
        self.generator = generator
        self.scheduler = self.generator.get_scheduler()
        self.denoising_step_list = torch.tensor(denoising_step_list, dtype=torch.long)
        self.num_transformer_blocks = 30
        self.frame_seq_length = 1560
        self.kv_cache1 = None
        self.num_frame_per_block = num_frame_per_block
        self.context_noise = context_noise
        self.local_attn_size = self.generator.model.local_attn_size
        if self.num_frame_per_block > 1:
            self.generator.model.num_frame_per_block = self.num_frame_per_block
        self.chunk_done = None

    def inference(self, noise, conditional_dict):
        batch_size, num_frames, num_channels, height, width = noise.shape
        assert num_frames % self.num_frame_per_block == 0
        num_blocks = num_frames // self.num_frame_per_block
        output = torch.zeros([batch_size, num_frames, num_channels, height, width], device=noise.device,
                             dtype=noise.dtype)
        if self.kv_cache1 is None:
            self._initialize_kv_cache(batch_size=batch_size, dtype=noise.dtype, device=noise.device)
            self._initialize_crossattn_cache(batch_size=batch_size, dtype=noise.dtype, device=noise.device)
        else:
            for block_index in range(self.num_transformer_blocks):
                self.crossattn_cache[block_index]["is_init"] = False
            for block_index in range(len(self.kv_cache1)):
                self.kv_cache1[block_index]["global_end_index"] = torch.tensor([0], dtype=torch.long,
                                                                               device=noise.device)
                self.kv_cache1[block_index]["local_end_index"] = torch.tensor([0], dtype=torch.long,
                                                                              device=noise.device)
        current_start_frame = 0
        for current_num_frames in [self.num_frame_per_block] * num_blocks:
            noisy_input = noise[:, current_start_frame:current_start_frame + current_num_frames]
            for index, current_timestep in enumerate(self.denoising_step_list):
                timestep = torch.ones([batch_size, current_num_frames], device=noise.device,
                                      dtype=torch.int64) * current_timestep
                _, denoised_pred = self.generator(
                    noisy_image_or_video=noisy_input, conditional_dict=conditional_dict, timestep=timestep,
                    kv_cache=self.kv_cache1, crossattn_cache=self.crossattn_cache,
                    current_start=current_start_frame * self.frame_seq_length)
                if index < len(self.denoising_step_list) - 1:
                    next_timestep = self.denoising_step_list[index + 1]
                    noisy_input = self.scheduler.add_noise(
                        denoised_pred.flatten(0, 1), torch.randn_like(denoised_pred.flatten(0, 1)),
                        next_timestep * torch.ones([batch_size * current_num_frames], device=noise.device,
                                                   dtype=torch.long)).unflatten(0, denoised_pred.shape[:2])
            output[:, current_start_frame:current_start_frame + current_num_frames] = denoised_pred
            context_timestep = torch.ones_like(timestep) * self.context_noise
            self.generator(noisy_image_or_video=denoised_pred, conditional_dict=conditional_dict,
                           timestep=context_timestep, kv_cache=self.kv_cache1, crossattn_cache=self.crossattn_cache,
                           current_start=current_start_frame * self.frame_seq_length)
            if self.chunk_done is not None:
                self.chunk_done(denoised_pred)
            current_start_frame += current_num_frames
        return output

    def _initialize_kv_cache(self, batch_size, dtype, device):
        self.kv_cache1 = kv_cache_list(self, batch_size, dtype, device)

    def _initialize_crossattn_cache(self, batch_size, dtype, device):
        self.crossattn_cache = crossattn_cache_list(self, batch_size, dtype, device)


def kv_cache_list(pipe, batch_size, dtype, device) -> list[dict]:
    """One per-block self-attention cache list as upstream's pipelines make it
    (``_initialize_kv_cache``): a window of ``local_attn_size`` frames, or its literal size."""
    size = pipe.local_attn_size * pipe.frame_seq_length if pipe.local_attn_size != -1 else pipe.KV_TOKENS
    return [{
        "k": torch.zeros([batch_size, size, pipe.KV_HEADS, pipe.KV_HEAD_DIM], dtype=dtype, device=device),
        "v": torch.zeros([batch_size, size, pipe.KV_HEADS, pipe.KV_HEAD_DIM], dtype=dtype, device=device),
        "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
        "local_end_index": torch.tensor([0], dtype=torch.long, device=device),
    } for _ in range(pipe.num_transformer_blocks)]


def crossattn_cache_list(pipe, batch_size, dtype, device) -> list[dict]:
    """One per-block cross-attention cache list (``_initialize_crossattn_cache``)."""
    return [{
        "k": torch.zeros([batch_size, pipe.TEXT_TOKENS, pipe.KV_HEADS, pipe.KV_HEAD_DIM], dtype=dtype, device=device),
        "v": torch.zeros([batch_size, pipe.TEXT_TOKENS, pipe.KV_HEADS, pipe.KV_HEAD_DIM], dtype=dtype, device=device),
        "is_init": False,
    } for _ in range(pipe.num_transformer_blocks)]


# -- pipeline/causal_diffusion_inference.py --------------------------------------------------------


class CausalDiffusionInferencePipeline(nn.Module):
    """Upstream's classifier-free-guidance pipeline (the many-step causal diffusion model): per
    chunk, each of the sample scheduler's timesteps runs the model twice, on ``kv_cache_pos`` with
    the prompt and on ``kv_cache_neg`` with the negative prompt, then both take the clean context
    pass. Without the text encoder and VAE (``inference`` takes both encoded prompts and returns
    the latents) and without the image-to-video branch; upstream's UniPC solver for flow matching
    (``wan/utils/fm_solvers_unipc.py``) is diffusers' ``UniPCMultistepScheduler`` with flow sigmas
    here, which takes as many steps. The cache shapes' literals are class attributes, as in
    :class:`CausalInferencePipeline`."""

    KV_HEADS, KV_HEAD_DIM, KV_TOKENS, TEXT_TOKENS = 12, 128, 32760, 512

    def __init__(self, generator: WanDiffusionWrapper, sampling_steps=50, shift=5.0, guidance_scale=3.0,
                 num_frame_per_block=3, independent_first_frame=False):
        super().__init__()
        self.generator = generator
        self.num_train_timesteps = 1000
        self.sampling_steps = sampling_steps
        self.shift = shift
        self.guidance_scale = guidance_scale
        self.num_transformer_blocks = 30
        self.frame_seq_length = 1560
        self.kv_cache_pos = None
        self.kv_cache_neg = None
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.local_attn_size = self.generator.model.local_attn_size
        if self.num_frame_per_block > 1:
            self.generator.model.num_frame_per_block = self.num_frame_per_block

    def inference(self, noise, conditional_dict, unconditional_dict):
        batch_size, num_frames, num_channels, height, width = noise.shape
        if not self.independent_first_frame:
            assert num_frames % self.num_frame_per_block == 0
            num_blocks = num_frames // self.num_frame_per_block
        else:
            assert (num_frames - 1) % self.num_frame_per_block == 0
            num_blocks = (num_frames - 1) // self.num_frame_per_block
        output = torch.zeros([batch_size, num_frames, num_channels, height, width], device=noise.device,
                             dtype=noise.dtype)
        if self.kv_cache_pos is None:
            self._initialize_kv_cache(batch_size=batch_size, dtype=noise.dtype, device=noise.device)
            self._initialize_crossattn_cache(batch_size=batch_size, dtype=noise.dtype, device=noise.device)
        else:
            for block_index in range(self.num_transformer_blocks):
                self.crossattn_cache_pos[block_index]["is_init"] = False
                self.crossattn_cache_neg[block_index]["is_init"] = False
            for block_index in range(len(self.kv_cache_pos)):
                for cache in (self.kv_cache_pos, self.kv_cache_neg):
                    cache[block_index]["global_end_index"] = torch.tensor([0], dtype=torch.long, device=noise.device)
                    cache[block_index]["local_end_index"] = torch.tensor([0], dtype=torch.long, device=noise.device)
        current_start_frame = 0
        all_num_frames = [self.num_frame_per_block] * num_blocks
        if self.independent_first_frame:
            all_num_frames = [1] + all_num_frames
        for current_num_frames in all_num_frames:
            latents = noise[:, current_start_frame:current_start_frame + current_num_frames]
            sample_scheduler = self._initialize_sample_scheduler(noise)
            for t in sample_scheduler.timesteps:
                timestep = t * torch.ones([batch_size, current_num_frames], device=noise.device, dtype=torch.float32)
                flow_pred_cond, _ = self.generator(
                    noisy_image_or_video=latents, conditional_dict=conditional_dict, timestep=timestep,
                    kv_cache=self.kv_cache_pos, crossattn_cache=self.crossattn_cache_pos,
                    current_start=current_start_frame * self.frame_seq_length,
                    cache_start=current_start_frame * self.frame_seq_length)
                flow_pred_uncond, _ = self.generator(
                    noisy_image_or_video=latents, conditional_dict=unconditional_dict, timestep=timestep,
                    kv_cache=self.kv_cache_neg, crossattn_cache=self.crossattn_cache_neg,
                    current_start=current_start_frame * self.frame_seq_length,
                    cache_start=current_start_frame * self.frame_seq_length)
                flow_pred = flow_pred_uncond + self.guidance_scale * (flow_pred_cond - flow_pred_uncond)
                latents = sample_scheduler.step(flow_pred, t, latents, return_dict=False)[0]
            output[:, current_start_frame:current_start_frame + current_num_frames] = latents
            for cache, cross, prompt in ((self.kv_cache_pos, self.crossattn_cache_pos, conditional_dict),
                                         (self.kv_cache_neg, self.crossattn_cache_neg, unconditional_dict)):
                self.generator(noisy_image_or_video=latents, conditional_dict=prompt, timestep=timestep * 0,
                               kv_cache=cache, crossattn_cache=cross,
                               current_start=current_start_frame * self.frame_seq_length,
                               cache_start=current_start_frame * self.frame_seq_length)
            current_start_frame += current_num_frames
        return output

    def _initialize_kv_cache(self, batch_size, dtype, device):
        self.kv_cache_pos = kv_cache_list(self, batch_size, dtype, device)
        self.kv_cache_neg = kv_cache_list(self, batch_size, dtype, device)

    def _initialize_crossattn_cache(self, batch_size, dtype, device):
        self.crossattn_cache_pos = crossattn_cache_list(self, batch_size, dtype, device)
        self.crossattn_cache_neg = crossattn_cache_list(self, batch_size, dtype, device)

    def _initialize_sample_scheduler(self, noise):
        from diffusers import UniPCMultistepScheduler

        sample_scheduler = UniPCMultistepScheduler(num_train_timesteps=self.num_train_timesteps,
                                                   prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=self.shift)
        sample_scheduler.set_timesteps(self.sampling_steps, device=noise.device)
        self.timesteps = sample_scheduler.timesteps
        return sample_scheduler
