"""LongCat-Video's DiT and its condition-frame cache, restated for the CPU (github
meituan-longcat/LongCat-Video is not pip-installable), for tests/caches/test_adapter_longcat_video.py.

Restated from upstream with its shapes, RoPE placement and cache build / read / reset:

- ``longcat_video/modules/rope_3d.py``: ``broadcat``, ``rotate_half``, ``RotaryPositionalEmbedding``
  (the same tables and math);
- ``longcat_video/modules/attention.py``: ``Attention.forward`` (``return_kv``: K/V cloned after the
  q/k norms, before RoPE; the condition mode that splits condition and noise queries),
  ``Attention.forward_with_kv_cache`` ([cached, current] concatenated, roped together over the
  (T + num_cond_latents, H, W) grid, a batch-1 cache repeated) and ``MultiHeadCrossAttention``;
- ``longcat_video/modules/blocks.py``: ``RMSNorm_FP32``, ``LayerNorm_FP32``, ``modulate_fp32``,
  ``FeedForwardSwiGLU``, ``PatchEmbed3D``, ``TimestepEmbedder``, ``CaptionEmbedder``, ``FinalLayer_FP32``;
- ``longcat_video/modules/longcat_video_dit.py``: ``LongCatSingleStreamBlock.forward`` (the cached pair
  moved with ``.to()``) and ``LongCatVideoTransformer3DModel.forward`` (``kv_cache_dict`` collected with
  ``.contiguous()``, or ``.cpu()`` with ``offload_kv_cache``);
- ``longcat_video/pipeline_longcat_video.py``: ``_cache_clean_latents`` and the denoising loop of
  ``generate_vc`` (CFG-zero's ``optimized_scale``, the prediction negated for the scheduler).

Replaced: flash-attn / xformers (CUDA-only) by ``scaled_dot_product_attention`` with the same
softmax scale (the varlen cross attention by one call per batch row); the CUDA autocast contexts
are dropped (the test model is fp32); the scheduler step is a flow-match Euler step; no text
encoder or VAE (the caption embeddings are given); block-sparse attention raises (CUDA-only).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

# -- modules/rope_3d.py ---------------------------------------------------------------------------


def broadcat(tensors, dim=-1):
    shape_len = len(tensors[0].shape)
    dim = (dim + shape_len) if dim < 0 else dim
    dims = list(zip(*(list(t.shape) for t in tensors)))
    expandable_dims = [(i, val) for i, val in enumerate(dims) if i != dim]
    max_dims = [(t[0], max(t[1])) for t in expandable_dims]
    expanded_dims = [(t[0], (t[1],) * len(tensors)) for t in max_dims]
    expanded_dims.insert(dim, (dim, dims[dim]))
    expandable_shapes = list(zip(*(t[1] for t in expanded_dims)))
    tensors = [t[0].expand(*t[1]) for t in zip(tensors, expandable_shapes)]
    return torch.cat(tensors, dim=dim)


def rotate_half(x):
    x = rearrange(x, "... (d r) -> ... d r", r=2)
    x1, x2 = x.unbind(dim=-1)
    x = torch.stack((-x2, x1), dim=-1)
    return rearrange(x, "... d r -> ... (d r)")


class RotaryPositionalEmbedding(nn.Module):
    def __init__(self, head_dim, cp_split_hw=None):
        super().__init__()
        self.head_dim = head_dim
        assert self.head_dim % 8 == 0, "Dim must be a multiply of 8 for 3D RoPE."
        self.cp_split_hw = cp_split_hw
        self.base = 10000
        self.freqs_dict = {}

    def register_grid_size(self, grid_size):
        if grid_size not in self.freqs_dict:
            self.freqs_dict.update({grid_size: self.precompute_freqs_cis_3d(grid_size)})

    def precompute_freqs_cis_3d(self, grid_size):
        num_frames, height, width = grid_size
        dim_t = self.head_dim - 4 * (self.head_dim // 6)
        dim_h = 2 * (self.head_dim // 6)
        dim_w = 2 * (self.head_dim // 6)
        freqs_t = 1.0 / (self.base ** (torch.arange(0, dim_t, 2)[: (dim_t // 2)].float() / dim_t))
        freqs_h = 1.0 / (self.base ** (torch.arange(0, dim_h, 2)[: (dim_h // 2)].float() / dim_h))
        freqs_w = 1.0 / (self.base ** (torch.arange(0, dim_w, 2)[: (dim_w // 2)].float() / dim_w))
        grid_t = torch.from_numpy(np.linspace(0, num_frames, num_frames, endpoint=False, dtype=np.float32)).float()
        grid_h = torch.from_numpy(np.linspace(0, height, height, endpoint=False, dtype=np.float32)).float()
        grid_w = torch.from_numpy(np.linspace(0, width, width, endpoint=False, dtype=np.float32)).float()
        freqs_t = repeat(torch.einsum("..., f -> ... f", grid_t, freqs_t), "... n -> ... (n r)", r=2)
        freqs_h = repeat(torch.einsum("..., f -> ... f", grid_h, freqs_h), "... n -> ... (n r)", r=2)
        freqs_w = repeat(torch.einsum("..., f -> ... f", grid_w, freqs_w), "... n -> ... (n r)", r=2)
        freqs = broadcat((freqs_t[:, None, None, :], freqs_h[None, :, None, :], freqs_w[None, None, :, :]), dim=-1)
        return rearrange(freqs, "T H W D -> (T H W) D")  # (cp_split_hw = [1, 1]: no context-parallel split)

    def forward(self, q, k, grid_size):
        if grid_size not in self.freqs_dict:
            self.register_grid_size(grid_size)
        freqs_cis = self.freqs_dict[grid_size].to(q.device)
        q_, k_ = q.float(), k.float()
        freqs_cis = freqs_cis.float().to(q.device)
        cos, sin = freqs_cis.cos(), freqs_cis.sin()
        cos, sin = rearrange(cos, "n d -> 1 1 n d"), rearrange(sin, "n d -> 1 1 n d")
        q_ = (q_ * cos) + (rotate_half(q_) * sin)
        k_ = (k_ * cos) + (rotate_half(k_) * sin)
        return q_.type_as(q), k_.type_as(k)


# -- modules/blocks.py ----------------------------------------------------------------------------


class RMSNorm_FP32(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm_FP32(nn.LayerNorm):
    def forward(self, inputs):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(inputs.float(), self.normalized_shape, weight, bias, self.eps).to(inputs.dtype)


def modulate_fp32(norm_func, x, shift, scale):
    dtype = x.dtype
    x = norm_func(x.to(torch.float32))
    return (x * (scale + 1) + shift).to(dtype)


class FeedForwardSwiGLU(nn.Module):
    def __init__(self, dim, hidden_dim, multiple_of=256):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # BCTHW -> BNC (sizes divisible: no padding)


class TimestepEmbedder(nn.Module):
    def __init__(self, t_embed_dim, frequency_embedding_size):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, t_embed_dim), nn.SiLU(),
                                 nn.Linear(t_embed_dim, t_embed_dim))

    def forward(self, t, dtype):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
        freqs = freqs.to(device=t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class CaptionEmbedder(nn.Module):
    def __init__(self, in_channels, hidden_size):
        super().__init__()
        self.y_proj = nn.Sequential(nn.Linear(in_channels, hidden_size), nn.GELU(approximate="tanh"),
                                    nn.Linear(hidden_size, hidden_size))

    def forward(self, caption):
        return self.y_proj(caption)


class FinalLayer_FP32(nn.Module):
    def __init__(self, hidden_size, num_patch, out_channels, adaln_tembed_dim):
        super().__init__()
        self.norm_final = LayerNorm_FP32(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 2 * hidden_size, bias=True))

    def forward(self, x, t, latent_shape):
        B, N, C = x.shape
        T, _, _ = latent_shape
        shift, scale = self.adaLN_modulation(t).unsqueeze(2).chunk(2, dim=-1)
        x = modulate_fp32(self.norm_final, x.view(B, T, -1, C), shift, scale).view(B, N, C)
        return self.linear(x)


# -- modules/attention.py -------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim, num_heads, enable_bsa=False, cp_split_hw=None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.enable_bsa = enable_bsa
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm_FP32(self.head_dim, eps=1e-6)
        self.k_norm = RMSNorm_FP32(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.rope_3d = RotaryPositionalEmbedding(self.head_dim, cp_split_hw=cp_split_hw)

    def _process_attn(self, q, k, v, shape):
        if self.enable_bsa and shape[0] > 1:
            raise NotImplementedError("block-sparse attention (flash_attn_bsa_3d) is CUDA-only")
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # flash_attn_func(softmax_scale=scale)

    def forward(self, x, shape=None, num_cond_latents=None, return_kv=False):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute((2, 0, 3, 1, 4))
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if return_kv:
            k_cache, v_cache = k.clone(), v.clone()
        q, k = self.rope_3d(q, k, shape)
        if num_cond_latents is not None and num_cond_latents > 0:
            num_cond_latents_thw = num_cond_latents * (N // shape[0])
            q_cond = q[:, :, :num_cond_latents_thw].contiguous()
            k_cond = k[:, :, :num_cond_latents_thw].contiguous()
            v_cond = v[:, :, :num_cond_latents_thw].contiguous()
            x_cond = self._process_attn(q_cond, k_cond, v_cond, shape)
            q_noise = q[:, :, num_cond_latents_thw:].contiguous()
            x_noise = self._process_attn(q_noise, k, v, shape)
            x = torch.cat([x_cond, x_noise], dim=2).contiguous()
        else:
            x = self._process_attn(q, k, v, shape)
        x = self.proj(x.transpose(1, 2).reshape(B, N, C))
        if return_kv:
            return x, (k_cache, v_cache)
        return x

    def forward_with_kv_cache(self, x, shape=None, num_cond_latents=None, kv_cache=None):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute((2, 0, 3, 1, 4))
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        T, H, W = shape
        k_cache, v_cache = kv_cache
        assert k_cache.shape[0] == v_cache.shape[0] and k_cache.shape[0] in [1, B]
        if k_cache.shape[0] == 1:
            k_cache = k_cache.repeat(B, 1, 1, 1)
            v_cache = v_cache.repeat(B, 1, 1, 1)
        if num_cond_latents is not None and num_cond_latents > 0:
            k_full = torch.cat([k_cache, k], dim=2).contiguous()
            v_full = torch.cat([v_cache, v], dim=2).contiguous()
            q_padding = torch.cat([torch.empty_like(k_cache), q], dim=2).contiguous()
            q_padding, k_full = self.rope_3d(q_padding, k_full, (T + num_cond_latents, H, W))
            q = q_padding[:, :, -N:].contiguous()
        x = self._process_attn(q, k_full, v_full, shape)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MultiHeadCrossAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm_FP32(self.head_dim, eps=1e-6)
        self.k_norm = RMSNorm_FP32(self.head_dim, eps=1e-6)

    def _process_cross_attn(self, x, cond, kv_seqlen):
        B, N, C = x.shape
        q = self.q_linear(x).view(1, -1, self.num_heads, self.head_dim)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        # flash_attn_varlen_func: row b's N queries attend to its kv_seqlen[b] caption tokens
        outs, start = [], 0
        for b, n in enumerate(kv_seqlen):
            qb = q[:, b * N : (b + 1) * N].transpose(1, 2)
            kb, vb = (t[:, start : start + n].transpose(1, 2) for t in (k, v))
            outs.append(F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2))
            start += n
        return self.proj(torch.cat(outs, 1).reshape(B, -1, C))

    def forward(self, x, cond, kv_seqlen, num_cond_latents=None, shape=None):
        if num_cond_latents is None or num_cond_latents == 0:
            return self._process_cross_attn(x, cond, kv_seqlen)
        B, N, C = x.shape
        num_cond_latents_thw = num_cond_latents * (N // shape[0])
        output_noise = self._process_cross_attn(x[:, num_cond_latents_thw:], cond, kv_seqlen)
        return torch.cat([torch.zeros((B, num_cond_latents_thw, C), dtype=output_noise.dtype, device=output_noise.device), output_noise], dim=1)


# -- modules/longcat_video_dit.py ----------------------------------------------------------------


class LongCatSingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, adaln_tembed_dim, cp_split_hw=None):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_tembed_dim, 6 * hidden_size, bias=True))
        self.mod_norm_attn = LayerNorm_FP32(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mod_norm_ffn = LayerNorm_FP32(hidden_size, eps=1e-6, elementwise_affine=False)
        self.pre_crs_attn_norm = LayerNorm_FP32(hidden_size, eps=1e-6, elementwise_affine=True)
        self.attn = Attention(dim=hidden_size, num_heads=num_heads, cp_split_hw=cp_split_hw)
        self.cross_attn = MultiHeadCrossAttention(dim=hidden_size, num_heads=num_heads)
        self.ffn = FeedForwardSwiGLU(dim=hidden_size, hidden_dim=int(hidden_size * mlp_ratio))

    def forward(self, x, y, t, y_seqlen, latent_shape, num_cond_latents=None, return_kv=False, kv_cache=None,
                skip_crs_attn=False):
        x_dtype = x.dtype
        B, N, C = x.shape
        T, _, _ = latent_shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(t).unsqueeze(2).chunk(6, dim=-1))
        x_m = modulate_fp32(self.mod_norm_attn, x.view(B, T, -1, C), shift_msa, scale_msa).view(B, N, C)
        if kv_cache is not None:
            kv_cache = (kv_cache[0].to(x.device), kv_cache[1].to(x.device))
            attn_outputs = self.attn.forward_with_kv_cache(x_m, shape=latent_shape, num_cond_latents=num_cond_latents,
                                                           kv_cache=kv_cache)
        else:
            attn_outputs = self.attn(x_m, shape=latent_shape, num_cond_latents=num_cond_latents, return_kv=return_kv)
        if return_kv:
            x_s, kv_cache = attn_outputs
        else:
            x_s = attn_outputs
        x = (x + (gate_msa * x_s.view(B, -1, N // T, C)).view(B, -1, C)).to(x_dtype)
        if not skip_crs_attn:
            if kv_cache is not None:
                num_cond_latents = None
            x = x + self.cross_attn(self.pre_crs_attn_norm(x), y, y_seqlen, num_cond_latents=num_cond_latents,
                                    shape=latent_shape)
        x_m = modulate_fp32(self.mod_norm_ffn, x.view(B, -1, N // T, C), shift_mlp, scale_mlp).view(B, -1, C)
        x = (x + (gate_mlp * self.ffn(x_m).view(B, -1, N // T, C)).view(B, -1, C)).to(x_dtype)
        if return_kv:
            return x, kv_cache
        return x


class LongCatVideoTransformer3DModel(nn.Module):
    def __init__(self, in_channels=4, out_channels=4, hidden_size=64, depth=2, num_heads=4, caption_channels=32,
                 mlp_ratio=4, adaln_tembed_dim=32, frequency_embedding_size=32, patch_size=(1, 2, 2),
                 cp_split_hw=(1, 1)):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.cp_split_hw = list(cp_split_hw)
        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList([
            LongCatSingleStreamBlock(hidden_size, num_heads, mlp_ratio, adaln_tembed_dim, cp_split_hw=self.cp_split_hw)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer_FP32(hidden_size, int(np.prod(patch_size)), out_channels, adaln_tembed_dim)

    def enable_bsa(self):
        for block in self.blocks:
            block.attn.enable_bsa = True

    def disable_bsa(self):
        for block in self.blocks:
            block.attn.enable_bsa = False

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, num_cond_latents=0,
                return_kv=False, kv_cache_dict={}, skip_crs_attn=False,  # noqa: B006 (upstream's default)
                offload_kv_cache=False):
        B, _, T, H, W = hidden_states.shape
        N_t, N_h, N_w = T // self.patch_size[0], H // self.patch_size[1], W // self.patch_size[2]
        if len(timestep.shape) == 1:
            timestep = timestep.unsqueeze(1).expand(-1, N_t)
        dtype = self.x_embedder.proj.weight.dtype
        hidden_states = self.x_embedder(hidden_states.to(dtype))
        t = self.t_embedder(timestep.to(dtype).float().flatten(), dtype=torch.float32).reshape(B, N_t, -1)
        encoder_hidden_states = self.y_embedder(encoder_hidden_states.to(dtype))
        if encoder_attention_mask is not None:
            encoder_attention_mask = encoder_attention_mask.squeeze(1).squeeze(1)
            encoder_hidden_states = encoder_hidden_states.squeeze(1).masked_select(
                encoder_attention_mask.unsqueeze(-1) != 0).view(1, -1, hidden_states.shape[-1])
            y_seqlens = encoder_attention_mask.sum(dim=1).tolist()
        else:
            y_seqlens = [encoder_hidden_states.shape[2]] * encoder_hidden_states.shape[0]
            encoder_hidden_states = encoder_hidden_states.squeeze(1).view(1, -1, hidden_states.shape[-1])
        kv_cache_dict_ret = {}
        for i, block in enumerate(self.blocks):
            block_outputs = block(hidden_states, encoder_hidden_states, t, y_seqlens, (N_t, N_h, N_w),
                                  num_cond_latents, return_kv, kv_cache_dict.get(i, None), skip_crs_attn)
            if return_kv:
                hidden_states, kv_cache = block_outputs
                if offload_kv_cache:
                    kv_cache_dict_ret[i] = (kv_cache[0].cpu(), kv_cache[1].cpu())
                else:
                    kv_cache_dict_ret[i] = (kv_cache[0].contiguous(), kv_cache[1].contiguous())
            else:
                hidden_states = block_outputs
        hidden_states = self.final_layer(hidden_states, t, (N_t, N_h, N_w))
        hidden_states = rearrange(  # unpatchify
            hidden_states, "B (N_t N_h N_w) (T_p H_p W_p C_out) -> B C_out (N_t T_p) (N_h H_p) (N_w W_p)",
            N_t=N_t, N_h=N_h, N_w=N_w, T_p=self.patch_size[0], H_p=self.patch_size[1], W_p=self.patch_size[2],
            C_out=self.out_channels).to(torch.float32)
        if return_kv:
            return hidden_states, kv_cache_dict_ret
        return hidden_states


# -- pipeline_longcat_video.py --------------------------------------------------------------------


def optimized_scale(positive_flat, negative_flat):
    dot_product = torch.sum(positive_flat * negative_flat, dim=1, keepdim=True)
    squared_norm = torch.sum(negative_flat**2, dim=1, keepdim=True) + 1e-8
    return dot_product / squared_norm


def cache_clean_latents(dit, cond_latents, text_len, caption_channels, offload_kv_cache=False):
    """``LongCatVideoPipeline._cache_clean_latents``: the condition pass; returns ``kv_cache_dict``."""
    device, dtype = cond_latents.device, cond_latents.dtype
    timestep = torch.zeros(cond_latents.shape[0], cond_latents.shape[2]).to(device=device, dtype=dtype)
    empty_embeds = torch.zeros([cond_latents.shape[0], 1, text_len, caption_channels], device=device, dtype=dtype)
    _, kv_cache_dict = dit(hidden_states=cond_latents, timestep=timestep, encoder_hidden_states=empty_embeds,
                           return_kv=True, skip_crs_attn=True, offload_kv_cache=offload_kv_cache)
    return kv_cache_dict


def generate_vc(dit, latents, num_cond_latents, prompt_embeds, prompt_attention_mask, sigmas, guidance_scale=4.0,
                use_kv_cache=True, kv_cache_dict=None):
    """``generate_vc``'s denoising from its prepared ``latents`` [B, C, T, H, W] (condition latents
    first): every step's noise prediction and the final latents. ``prompt_embeds`` holds the
    negative rows first when guidance_scale > 1 (CFG). ``kv_cache_dict``: a condition cache made
    beforehand (default: ``_cache_clean_latents`` here, as upstream)."""
    do_cfg = guidance_scale > 1
    preds = []
    with torch.no_grad():
        if use_kv_cache:
            cond_latents = latents[:, :, :num_cond_latents]
            if kv_cache_dict is None:
                kv_cache_dict = cache_clean_latents(dit, cond_latents, prompt_embeds.shape[2], prompt_embeds.shape[3])
            latents = latents[:, :, num_cond_latents:]
        else:
            kv_cache_dict = {}
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            t = sigma * 1000
            latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
            timestep = t.expand(latent_model_input.shape[0]).unsqueeze(-1).repeat(1, latent_model_input.shape[2])
            if not use_kv_cache:
                timestep[:, :num_cond_latents] = 0
            noise_pred = dit(hidden_states=latent_model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                             encoder_attention_mask=prompt_attention_mask, num_cond_latents=num_cond_latents,
                             kv_cache_dict=kv_cache_dict)
            if do_cfg:
                noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
                B = noise_pred_cond.shape[0]
                positive, negative = noise_pred_cond.reshape(B, -1), noise_pred_uncond.reshape(B, -1)
                st_star = optimized_scale(positive, negative).view(B, 1, 1, 1, 1)
                noise_pred = noise_pred_uncond * st_star + guidance_scale * (
                    noise_pred_cond - noise_pred_uncond * st_star)
            noise_pred = -noise_pred
            preds.append(noise_pred)
            # FlowMatchEulerDiscreteScheduler.step: x + (sigma_next - sigma) * v
            if use_kv_cache:
                latents = latents + (sigma_next - sigma) * noise_pred
            else:
                step = (sigma_next - sigma) * noise_pred[:, :, num_cond_latents:]
                latents[:, :, num_cond_latents:] = latents[:, :, num_cond_latents:] + step
        if use_kv_cache:
            latents = torch.cat([cond_latents, latents], dim=2)
    return preds, latents
