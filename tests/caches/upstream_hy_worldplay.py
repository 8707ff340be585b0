"""HY-WorldPlay's AR transformer, memory retrieval and vision cache, restated for the CPU (github
Tencent-Hunyuan/HY-WorldPlay is not pip-installable), for tests/caches/test_adapter_hy_worldplay.py.

Restated from upstream with its shapes, RoPE and PRoPE placement and cache build / read / reset:

- ``hyvideo/models/transformers/modules/posemb_layers.py``: ``get_meshgrid_nd``,
  ``get_1d_rotary_pos_embed``, ``get_nd_rotary_pos_embed`` (real cos / sin), ``rotate_half``,
  ``apply_rotary_emb`` (the (cos, sin) tuple case);
- ``hyvideo/prope/camera_rope.py``: ``prope_qkv`` with intrinsics (P = lift(K) @ viewmat applied
  per token: queries by P^T, keys and values by P^-1, outputs by P), ``_invert_SE3``, ``_lift_K``,
  ``_invert_K``;
- ``hyvideo/models/transformers/modules/modulate_layers.py``: ``modulate``, ``apply_gate``, ``ModulateDiT``;
- ``hyvideo/models/transformers/modules/attention.py``: ``sequence_parallel_attention_txt`` and
  ``sequence_parallel_attention_vision`` (``cache_vision`` returns the pass's K/V; a read
  concatenates [text repeated to both streams, cached vision, current]);
- ``hyvideo/models/transformers/worldplay_1_5_transformer.py``: ``MMDoubleStreamBlock``
  (``modulate_txt``, ``modulate_img``, ``forward_txt``, ``forward_vision``) and the model's
  ``get_rotary_pos_embed``, ``forward_txt``, ``forward_vision`` (RoPE rows sliced at
  ``start_rope_start_idx``; a ``cache_vision`` pass returns the per-block cache dicts),
  ``add_action_parameters``, ``unpatchify``;
- ``hyvideo/utils/retrieval_context.py``: ``select_aligned_memory_frames`` and the FOV-overlap
  distance it ranks clips by (Monte Carlo points given as ``points_local``);
- ``hyvideo/pipelines/worldplay_video_pipeline.py``: ``init_kv_cache`` and ``_ar_rollout_inner``.

Simplified (not cache handling): the text path's embedding is one linear layer over masked tokens
(upstream: a token refiner, byT5 and SigLIP tokens reordered; ``extra_kwargs`` is passed along
unused); the patch embedding, timestep embedders and final layer keep their shapes with plain
layers; no sequence parallelism, SageAttention, offloading (``auto_offload_model`` enters
nothing) or CUDA autocast; the scheduler is a flow-match Euler step.
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

# -- posemb_layers.py -------------------------------------------------------------------------------


def get_meshgrid_nd(start, *args, dim=2):
    if len(args) == 0:
        num = (start,) * dim if isinstance(start, int) else start
        start, stop = (0,) * dim, num
    else:
        stop = args[0]
        num = [stop[i] - start[i] for i in range(dim)]
    axis_grid = [torch.linspace(start[i], stop[i], num[i] + 1, dtype=torch.float32)[: num[i]] for i in range(dim)]
    return torch.stack(torch.meshgrid(*axis_grid, indexing="ij"), dim=0)


def get_1d_rotary_pos_embed(dim, pos, theta=10000.0, use_real=False, theta_rescale_factor=1.0,
                            interpolation_factor=1.0):
    if theta_rescale_factor != 1.0:
        theta *= theta_rescale_factor ** (dim / (dim - 2))
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    freqs = torch.outer(pos * interpolation_factor, freqs)
    return freqs.cos().repeat_interleave(2, dim=1), freqs.sin().repeat_interleave(2, dim=1)  # use_real=True


def get_nd_rotary_pos_embed(rope_dim_list, start, *args, theta=10000.0, use_real=False, theta_rescale_factor=1.0,
                            interpolation_factor=1.0):
    grid = get_meshgrid_nd(start, *args, dim=len(rope_dim_list))
    embs = [get_1d_rotary_pos_embed(rope_dim_list[i], grid[i].reshape(-1), theta, use_real=use_real,
                                    theta_rescale_factor=theta_rescale_factor) for i in range(len(rope_dim_list))]
    return torch.cat([emb[0] for emb in embs], dim=1), torch.cat([emb[1] for emb in embs], dim=1)


def rotate_half(x):
    x_real, x_imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-x_imag, x_real], dim=-1).flatten(3)


def apply_rotary_emb(xq, xk, freqs_cis, head_first=False):
    assert not head_first
    cos, sin = (f.view(1, xq.shape[1], 1, xq.shape[-1]).to(xq.device) for f in freqs_cis)  # reshape_for_broadcast
    xq_out = (xq.float() * cos + rotate_half(xq.float()) * sin).type_as(xq)
    xk_out = (xk.float() * cos + rotate_half(xk.float()) * sin).type_as(xk)
    return xq_out, xk_out


# -- prope/camera_rope.py ---------------------------------------------------------------------------


def _invert_SE3(transforms):
    Rinv = transforms[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(transforms)
    out[..., :3, :3] = Rinv
    out[..., :3, 3] = -torch.einsum("...ij,...j->...i", Rinv, transforms[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def _lift_K(Ks):
    out = torch.zeros(Ks.shape[:-2] + (4, 4), device=Ks.device)
    out[..., :3, :3] = Ks
    out[..., 3, 3] = 1.0
    return out.to(dtype=Ks.dtype)


def _invert_K(Ks):
    out = torch.zeros_like(Ks)
    out[..., 0, 0] = 1.0 / Ks[..., 0, 0]
    out[..., 1, 1] = 1.0 / Ks[..., 1, 1]
    out[..., 0, 2] = -Ks[..., 0, 2] / Ks[..., 0, 0]
    out[..., 1, 2] = -Ks[..., 1, 2] / Ks[..., 1, 1]
    out[..., 2, 2] = 1.0
    return out


def _apply_tiled_projmat(feats, matrix):
    batch, num_heads, seqlen, feat_dim = feats.shape
    cameras, D = matrix.shape[1], matrix.shape[-1]
    assert seqlen >= cameras and seqlen % cameras == 0 and matrix.shape == (batch, cameras, D, D)
    return torch.einsum("bcij,bncpkj->bncpki", matrix,
                        feats.reshape((batch, num_heads, cameras, -1, feat_dim // D, D))).reshape(feats.shape)


def prope_qkv(q, k, v, *, viewmats, Ks, **kwargs):
    batch, cameras = q.shape[0], viewmats.shape[1]
    assert q.shape == k.shape == v.shape  # upstream's asserts, kept: they bind callers too
    assert viewmats.shape == (batch, cameras, 4, 4) and Ks.shape == (batch, cameras, 3, 3)
    Ks_norm = torch.zeros_like(Ks)
    Ks_norm[..., 0, 0] = Ks[..., 0, 0]
    Ks_norm[..., 1, 1] = Ks[..., 1, 1]
    Ks_norm[..., 2, 2] = 1.0
    P = torch.einsum("...ij,...jk->...ik", _lift_K(Ks_norm), viewmats)
    P_T = P.transpose(-1, -2).to(dtype=viewmats.dtype)
    P_inv = torch.einsum("...ij,...jk->...ik", _invert_SE3(viewmats), _lift_K(_invert_K(Ks_norm))).to(viewmats.dtype)
    apply_fn_o = lambda o: _apply_tiled_projmat(o, P)  # noqa: E731 (upstream's partial)
    return _apply_tiled_projmat(q, P_T), _apply_tiled_projmat(k, P_inv), _apply_tiled_projmat(v, P_inv), apply_fn_o


# -- modulate_layers.py, norm_layers.py, mlp_layers.py ----------------------------------------------


def modulate(x, shift=None, scale=None):
    shift = rearrange(shift.unsqueeze(0), "B (N T) C -> (B N) T C", N=x.shape[0])
    scale = rearrange(scale.unsqueeze(0), "B (N T) C -> (B N) T C", N=x.shape[0])
    token_length = x.shape[1] // shift.shape[1]
    return x * (1 + scale.repeat_interleave(token_length, dim=1).type_as(x)) + shift.repeat_interleave(
        token_length, dim=1).type_as(x)


def apply_gate(x, gate=None):
    gate = rearrange(gate.unsqueeze(0), "B (N T) C -> (B N) T C", N=x.shape[0])
    return x * gate.repeat_interleave(x.shape[1] // gate.shape[1], dim=1).type_as(x)


class ModulateDiT(nn.Module):
    def __init__(self, hidden_size, factor):
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, factor * hidden_size)  # upstream zero-initializes it

    def forward(self, x):
        return self.linear(self.act(x))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def mlp(hidden, width):
    return nn.Sequential(nn.Linear(hidden, width), nn.GELU(approximate="tanh"), nn.Linear(width, hidden))


def get_parallel_state():
    return types.SimpleNamespace(sp_enabled=False)


# -- modules/attention.py ---------------------------------------------------------------------------


def sequence_parallel_attention_txt(q, k, v, img_q_len, img_kv_len, attn_mode=None, text_mask=None, attn_param=None,
                                    block_idx=None, kv_cache=None, cache_txt=False):
    encoder_query, encoder_key, encoder_value = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    t_kv = {}
    if cache_txt:
        t_kv["k_txt"] = encoder_key
        t_kv["v_txt"] = encoder_value
    encoder_hidden_states = F.scaled_dot_product_attention(encoder_query, encoder_key, encoder_value).transpose(1, 2)
    b, s, a, d = encoder_hidden_states.shape
    return encoder_hidden_states.reshape(b, s, -1), t_kv


def sequence_parallel_attention_vision(q, k, v, block_idx=None, kv_cache=None, cache_vision=False):
    assert kv_cache is not None
    query, query_prope = q
    key, key_prope = k
    value, value_prope = v
    query = torch.cat([query, query_prope], dim=0).transpose(1, 2)
    key = torch.cat([key, key_prope], dim=0).transpose(1, 2)
    value = torch.cat([value, value_prope], dim=0).transpose(1, 2)
    cache_vision_key = kv_cache[block_idx]["k_vision"]
    cache_vision_value = kv_cache[block_idx]["v_vision"]
    vision_kv = {}
    if cache_vision:
        vision_kv["k_vision"] = key
        vision_kv["v_vision"] = value
    if not cache_vision and cache_vision_key is not None:
        key = torch.cat([cache_vision_key, key], dim=2)
        value = torch.cat([cache_vision_value, value], dim=2)
    encoder_key = repeat(kv_cache[block_idx]["k_txt"], "B H S D->(B R) H S D", R=2)
    encoder_value = repeat(kv_cache[block_idx]["v_txt"], "B H S D->(B R) H S D", R=2)
    key = torch.cat([encoder_key, key], dim=2)
    value = torch.cat([encoder_value, value], dim=2)
    hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False).transpose(1, 2)
    b, s, a, d = hidden_states.shape
    hidden_states, hidden_states_prope = torch.chunk(hidden_states.reshape(b, s, -1), chunks=2, dim=0)
    return hidden_states, hidden_states_prope, vision_kv


# -- worldplay_1_5_transformer.py -------------------------------------------------------------------


class MMDoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, heads_num, mlp_width_ratio=2.0):
        super().__init__()
        self.heads_num = heads_num
        head_dim = hidden_size // heads_num
        self.img_mod = ModulateDiT(hidden_size, factor=6)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn_q, self.img_attn_k, self.img_attn_v = (nn.Linear(hidden_size, hidden_size) for _ in range(3))
        self.img_attn_q_norm, self.img_attn_k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.img_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = mlp(hidden_size, int(hidden_size * mlp_width_ratio))
        self.txt_mod = ModulateDiT(hidden_size, factor=6)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn_q, self.txt_attn_k, self.txt_attn_v = (nn.Linear(hidden_size, hidden_size) for _ in range(3))
        self.txt_attn_q_norm, self.txt_attn_k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.txt_attn_proj = nn.Linear(hidden_size, hidden_size)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = mlp(hidden_size, int(hidden_size * mlp_width_ratio))

    def modulate_txt(self, vec_txt, txt):
        mod1_shift, mod1_scale, mod1_gate, mod2_shift, mod2_scale, mod2_gate = self.txt_mod(vec_txt).chunk(6, dim=-1)
        txt_modulated = modulate(self.txt_norm1(txt), shift=mod1_shift, scale=mod1_scale)
        q, k, v = (rearrange(f(txt_modulated), "B L (H D) -> B L H D", H=self.heads_num)
                   for f in (self.txt_attn_q, self.txt_attn_k, self.txt_attn_v))
        q, k = self.txt_attn_q_norm(q).to(v), self.txt_attn_k_norm(k).to(v)
        return q, k, v, mod1_gate, mod2_shift, mod2_scale, mod2_gate

    def modulate_img(self, vec, img):
        mod1_shift, mod1_scale, mod1_gate, mod2_shift, mod2_scale, mod2_gate = self.img_mod(vec).chunk(6, dim=-1)
        img_modulated = modulate(self.img_norm1(img), shift=mod1_shift, scale=mod1_scale)
        q, k, v = (rearrange(f(img_modulated), "B L (H D) -> B L H D", H=self.heads_num)
                   for f in (self.img_attn_q, self.img_attn_k, self.img_attn_v))
        q, k = self.img_attn_q_norm(q).to(v), self.img_attn_k_norm(k).to(v)
        return q, k, v, mod1_gate, mod2_shift, mod2_scale, mod2_gate

    def forward_txt(self, txt, vec_txt, text_mask=None, attn_param=None, is_flash=False, block_idx=None,
                    kv_cache=None, cache_txt=False):
        txt_q, txt_k, txt_v, gate1, shift2, scale2, gate2 = self.modulate_txt(vec_txt, txt)
        txt_attn, t_kv = sequence_parallel_attention_txt(txt_q, txt_k, txt_v, img_q_len=txt_q.shape[1],
                                                         img_kv_len=txt_k.shape[1], text_mask=text_mask,
                                                         attn_mode="torch_causal", attn_param=attn_param,
                                                         block_idx=block_idx, kv_cache=kv_cache, cache_txt=cache_txt)
        txt = txt + apply_gate(self.txt_attn_proj(txt_attn), gate=gate1)
        txt = txt + apply_gate(self.txt_mlp(modulate(self.txt_norm2(txt), shift=shift2, scale=scale2)), gate=gate2)
        return txt, t_kv

    def forward_vision(self, img, vec, freqs_cis=None, attn_param=None, block_idx=None, viewmats=None, Ks=None,
                       kv_cache=None, cache_vision=False):
        img_q, img_k, img_v, gate1, shift2, scale2, gate2 = self.modulate_img(vec, img)
        img_q_prope, img_k_prope, img_v_prope, apply_fn_o = prope_qkv(
            img_q.permute(0, 2, 1, 3), img_k.permute(0, 2, 1, 3), img_v.permute(0, 2, 1, 3), viewmats=viewmats, Ks=Ks)
        img_q_prope, img_k_prope, img_v_prope = (x.permute(0, 2, 1, 3) for x in (img_q_prope, img_k_prope, img_v_prope))
        if freqs_cis is not None:
            img_q, img_k = apply_rotary_emb(img_q, img_k, freqs_cis, head_first=False)
        img_attn, img_attn_prope, vision_kv = sequence_parallel_attention_vision(
            (img_q, img_q_prope), (img_k, img_k_prope), (img_v, img_v_prope), block_idx=block_idx, kv_cache=kv_cache,
            cache_vision=cache_vision)
        img_attn_prope = rearrange(img_attn_prope, "B L (H D) -> B H L D", H=self.heads_num)
        img_attn_prope = rearrange(apply_fn_o(img_attn_prope), "B H L D -> B L (H D)")
        img = img + apply_gate(self.img_attn_proj(img_attn) + self.img_attn_prope_proj(img_attn_prope), gate=gate1)
        img = img + apply_gate(self.img_mlp(modulate(self.img_norm2(img), shift=shift2, scale=scale2)), gate=gate2)
        return img, vision_kv

    def forward(self, bi_inference=True, ar_txt_inference=False, ar_vision_inference=False, **kwargs):
        if ar_txt_inference:
            return self.forward_txt(**kwargs)
        assert ar_vision_inference, "only the AR paths are restated"
        return self.forward_vision(**kwargs)


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(device=t.device)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=32):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class HunyuanVideo_1_5_DiffusionTransformer(nn.Module):
    def __init__(self, in_channels=4, hidden_size=64, heads_num=2, mm_double_blocks_depth=2, rope_dim_list=(8, 12, 12),
                 rope_theta=256, text_states_dim=24, patch_size=(1, 1, 1), mlp_width_ratio=2.0):
        super().__init__()
        self.patch_size = list(patch_size)
        self.unpatchify_channels = in_channels
        self.rope_dim_list = list(rope_dim_list)
        self.rope_theta = rope_theta
        self.hidden_size, self.heads_num = hidden_size, heads_num
        assert sum(rope_dim_list) == hidden_size // heads_num
        # PatchEmbed (concat_condition: latents, condition latents and a mask channel)
        self.img_in = nn.Conv3d(in_channels * 2 + 1, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.txt_in = nn.Linear(text_states_dim, hidden_size)
        self.time_in = TimestepEmbedder(hidden_size)
        self.double_blocks = nn.ModuleList([MMDoubleStreamBlock(hidden_size, heads_num, mlp_width_ratio)
                                            for _ in range(mm_double_blocks_depth)])
        self.final_layer = nn.Linear(hidden_size, int(math.prod(patch_size)) * in_channels)
        self.attn_param = {}

    def add_action_parameters(self):
        self.action_in = TimestepEmbedder(self.hidden_size)
        for block in self.double_blocks:
            block.img_attn_prope_proj = nn.Linear(self.hidden_size, self.hidden_size)  # upstream zero-initializes it

    def get_rotary_pos_embed(self, rope_sizes):
        return get_nd_rotary_pos_embed(self.rope_dim_list, rope_sizes, theta=self.rope_theta, use_real=True,
                                       theta_rescale_factor=1)

    def forward_txt(self, timestep_txt, text_states, encoder_attention_mask, vision_states=None, mask_type="t2v",
                    extra_kwargs=None, kv_cache=None, cache_txt=False):
        if cache_txt:
            _kv_cache_new = [{"k_vision": None, "v_vision": None, "k_txt": None, "v_txt": None}
                             for _ in range(len(self.double_blocks))]
        vec_txt = self.time_in(timestep_txt)
        txt = self.txt_in(text_states)  # get_text_and_mask, simplified
        txt = txt[encoder_attention_mask.bool()].unsqueeze(0)
        for index, block in enumerate(self.double_blocks):
            txt, t_kv = block(bi_inference=False, ar_txt_inference=True, ar_vision_inference=False, txt=txt,
                              vec_txt=vec_txt, text_mask=None, attn_param=None, is_flash=False, block_idx=index,
                              kv_cache=kv_cache, cache_txt=cache_txt)
            if cache_txt:
                _kv_cache_new[index]["k_txt"] = t_kv["k_txt"]
                _kv_cache_new[index]["v_txt"] = t_kv["v_txt"]
        if cache_txt:
            return _kv_cache_new

    def forward_vision(self, hidden_states, timestep, timestep_r=None, freqs_cos=None, freqs_sin=None,
                       return_dict=False, mask_type="t2v", extra_kwargs=None, action=None, viewmats=None, Ks=None,
                       kv_cache=None, cache_vision=False, rope_temporal_size=4, start_rope_start_idx=0):
        if cache_vision:
            _kv_cache_new = [{"k_vision": None, "v_vision": None, "k_txt": kv_cache[i]["k_txt"],
                              "v_txt": kv_cache[i]["v_txt"]} for i in range(len(self.double_blocks))]
        img = hidden_states
        bs, _, ot, oh, ow = img.shape
        tt, th, tw = ot // self.patch_size[0], oh // self.patch_size[1], ow // self.patch_size[2]
        rope_temporal_size = rope_temporal_size // self.patch_size[0]
        freqs_cos, freqs_sin = self.get_rotary_pos_embed((rope_temporal_size, th, tw))
        per_latent_size = th * tw
        start_index, end_index = start_rope_start_idx * per_latent_size, (start_rope_start_idx + tt) * per_latent_size
        freqs_cos, freqs_sin = freqs_cos[start_index:end_index, ...], freqs_sin[start_index:end_index, ...]
        img = self.img_in(img).flatten(2).transpose(1, 2)
        vec = self.time_in(timestep.reshape(-1)) + self.action_in(action.reshape(-1))
        vec = repeat(vec, "(B T) C->B (T H W) C", B=img.shape[0], H=th, W=tw)
        viewmats = repeat(viewmats, "B T M N->B (T H W) M N", H=th, W=tw)
        Ks = repeat(Ks, "B T M N->B (T H W) M N", H=th, W=tw)
        vec = rearrange(vec, "B S C->(B S) C")
        for index, block in enumerate(self.double_blocks):
            img, vision_kv = block(bi_inference=False, ar_txt_inference=False, ar_vision_inference=True, img=img,
                                   vec=vec, freqs_cis=(freqs_cos, freqs_sin), attn_param=self.attn_param,
                                   block_idx=index, viewmats=viewmats, Ks=Ks, kv_cache=kv_cache,
                                   cache_vision=cache_vision)
            if cache_vision:
                _kv_cache_new[index]["k_vision"] = vision_kv["k_vision"]
                _kv_cache_new[index]["v_vision"] = vision_kv["v_vision"]
        if cache_vision:
            return _kv_cache_new
        img = self.final_layer(img)  # FinalLayer, simplified (no modulation)
        return self.unpatchify(img, tt, th, tw), None

    def forward(self, bi_inference=True, ar_txt_inference=False, ar_vision_inference=False, **kwargs):
        if ar_txt_inference:
            return self.forward_txt(**kwargs)
        assert ar_vision_inference, "only the AR paths are restated"
        return self.forward_vision(**kwargs)

    def unpatchify(self, x, t, h, w):
        c = self.unpatchify_channels
        pt, ph, pw = self.patch_size
        x = torch.einsum("nthwcopq->nctohpwq", x.reshape(shape=(x.shape[0], t, h, w, c, pt, ph, pw)))
        return x.reshape(shape=(x.shape[0], c, t * pt, h * ph, w * pw))


# -- utils/retrieval_context.py ---------------------------------------------------------------------


def rotation_matrix_to_angles(R):
    fwd = R.T[:, 2]
    x, y, z = fwd[0], fwd[1], fwd[2]
    return torch.atan2(y, torch.sqrt(x**2 + z**2)) * (180.0 / math.pi), torch.atan2(x, z) * (180.0 / math.pi)


def is_inside_fov_3d_hv(points, center, center_pitch, center_yaw, fov_half_h, fov_half_v):
    vectors = points - center[None, :] if points.ndim == 2 else points - center[None, ...]
    x, y, z = vectors[..., 0], vectors[..., 1], vectors[..., 2]
    azimuth = torch.atan2(x, z) * (180 / math.pi)
    elevation = torch.atan2(y, torch.sqrt(x**2 + z**2)) * (180 / math.pi)
    diff_azimuth = torch.remainder(azimuth - center_yaw + 180, 360) - 180
    diff_elevation = torch.remainder(elevation - center_pitch + 180, 360) - 180
    return (diff_azimuth.abs() < fov_half_h) & (diff_elevation.abs() < fov_half_v)


def calculate_fov_overlap_similarity(w2c_matrix_curr, w2c_matrix_hist, fov_h_deg=105.0, fov_v_deg=75.0, device=None,
                                     points_local=None):
    w2c_matrix_curr = torch.tensor(w2c_matrix_curr, device=device)
    w2c_matrix_hist = torch.tensor(w2c_matrix_hist, device=device)
    C_inv = w2c_matrix_curr
    w2c_matrix_curr = torch.linalg.inv(C_inv @ torch.linalg.inv(w2c_matrix_curr))
    w2c_matrix_hist = torch.linalg.inv(C_inv @ torch.linalg.inv(w2c_matrix_hist))
    R_curr, t_curr = w2c_matrix_curr[:3, :3], w2c_matrix_curr[:3, 3]
    R_hist, t_hist = w2c_matrix_hist[:3, :3], w2c_matrix_hist[:3, 3]
    P_w_curr, P_w_hist = -R_curr.T @ t_curr, -R_hist.T @ t_hist
    pitch_curr, yaw_curr = rotation_matrix_to_angles(R_curr)
    pitch_hist, yaw_hist = rotation_matrix_to_angles(R_hist)
    fov_half_h, fov_half_v = torch.tensor(fov_h_deg / 2.0, device=device), torch.tensor(fov_v_deg / 2.0, device=device)
    points_world = points_local + P_w_curr[None, :]
    in_fov_curr = is_inside_fov_3d_hv(points_world, P_w_curr[None, :], pitch_curr[None], yaw_curr[None], fov_half_h,
                                      fov_half_v)
    in_fov_hist = is_inside_fov_3d_hv(points_world, P_w_hist[None, :], pitch_hist[None], yaw_hist[None], fov_half_h,
                                      fov_half_v)
    dist = torch.norm(points_world - P_w_hist.reshape(1, -1), dim=1) < 8.0
    in_fov_hist = in_fov_hist.bool() & dist.reshape(1, -1).bool()
    fov_curr_count = in_fov_curr.sum().float()
    if fov_curr_count == 0:
        return 0.0
    return ((in_fov_curr.bool() & in_fov_hist.bool()).sum().float() / fov_curr_count).item()


def select_aligned_memory_frames(w2c_list, current_frame_idx, memory_frames, temporal_context_size, pred_latent_size,
                                 pos_weight=1.0, ang_weight=1.0, device=None, points_local=None):
    if current_frame_idx <= memory_frames:
        return list(range(0, current_frame_idx))
    num_total_frames = len(w2c_list)
    start_context_idx = max(0, current_frame_idx - temporal_context_size)
    context_frames_indices = list(range(start_context_idx, current_frame_idx))
    candidate_distances = []
    query_clip_indices = list(range(current_frame_idx, min(current_frame_idx + pred_latent_size, num_total_frames)))
    historical_clip_indices = list(range(4, current_frame_idx - temporal_context_size, 4))
    memory_frames_indices = [0, 1, 2, 3]
    memory_frames = memory_frames - temporal_context_size
    for hist_idx in historical_clip_indices:
        total_dist = 0
        for query_idx in query_clip_indices:
            d1 = 1.0 - calculate_fov_overlap_similarity(w2c_list[query_idx], w2c_list[hist_idx], fov_h_deg=60.0,
                                                        fov_v_deg=35.0, device=device, points_local=points_local)
            d2 = 1.0 - calculate_fov_overlap_similarity(w2c_list[query_idx], w2c_list[hist_idx + 2], fov_h_deg=60.0,
                                                        fov_v_deg=35.0, device=device, points_local=points_local)
            total_dist += (d1 + d2) / 2.0
        candidate_distances.append((hist_idx, total_dist / len(query_clip_indices)))
    candidate_distances.sort(key=lambda x: x[1])
    for start_idx, _ in candidate_distances:
        if len(memory_frames_indices) >= memory_frames:
            break
        if start_idx not in memory_frames_indices:
            memory_frames_indices.extend(range(start_idx, start_idx + 4))
    selected_frames_set = set(context_frames_indices)
    selected_frames_set.update(memory_frames_indices)
    return sorted(list(selected_frames_set))


# -- pipelines/worldplay_video_pipeline.py ----------------------------------------------------------


@contextlib.contextmanager
def auto_offload_model(model, device, enabled=True):
    yield  # hyvideo.commons: moves the model to the device and back when enabled; nothing to move here


class FlowMatchEuler:
    """The scheduler calls the rollout makes (FlowMatchDiscreteScheduler's Euler step)."""

    order = 1

    def __init__(self, timesteps):
        self.timesteps = timesteps
        self.sigmas = torch.cat([timesteps / 1000, torch.zeros(1)])

    def set_timesteps(self, num_inference_steps, device=None):
        self.step_index = 0

    def scale_model_input(self, sample, t):
        return sample

    def step(self, model_output, t, sample, return_dict=False):
        i = int((self.timesteps == t).nonzero()[0, 0])
        return (sample + (self.sigmas[i + 1] - self.sigmas[i]) * model_output,)


class HunyuanVideo_1_5_Pipeline:
    """The attributes and methods ``_ar_rollout_inner`` uses."""

    def __init__(self, transformer, timesteps, chunk_num, points_local, guidance_scale=3.0):
        self.transformer = transformer
        self.scheduler = FlowMatchEuler(timesteps)
        self.num_inference_steps, self.num_warmup_steps = len(timesteps), 0
        self.chunk_num, self.chunk_latent_frames = chunk_num, 4
        self.points_local = points_local
        self.guidance_scale = guidance_scale
        self.target_dtype, self.autocast_enabled = torch.float32, False
        self.enable_offloading, self.execution_device = False, "cpu"

    @property
    def do_classifier_free_guidance(self):
        return self.guidance_scale > 1

    def progress_bar(self, total=None):
        return contextlib.nullcontext(types.SimpleNamespace(update=lambda: None))

    def init_kv_cache(self):
        self._kv_cache = []
        self._kv_cache_neg = []
        for _ in range(len(self.transformer.double_blocks)):
            self._kv_cache.append({"k_vision": None, "v_vision": None, "k_txt": None, "v_txt": None})
            self._kv_cache_neg.append({"k_vision": None, "v_vision": None, "k_txt": None, "v_txt": None})

    def _ar_rollout_inner(self, latents, timesteps, prompt_embeds, prompt_mask, vision_states, cond_latents, task_type,
                          extra_kwargs, viewmats, Ks, action, device):
        self.init_kv_cache()
        positive_idx = 1 if self.do_classifier_free_guidance else 0
        stabilization_level = 15
        byt5 = ("byt5_text_states", "byt5_text_mask")
        extra_kwargs_pos = {key: extra_kwargs[key][positive_idx, None, ...] for key in byt5}
        t_expand_txt = torch.tensor([0]).to(device).to(latents.dtype)
        self._kv_cache = self.transformer(
            bi_inference=False, ar_txt_inference=True, ar_vision_inference=False, timestep_txt=t_expand_txt,
            text_states=prompt_embeds[positive_idx, None, ...],
            encoder_attention_mask=prompt_mask[positive_idx, None, ...],
            vision_states=vision_states[positive_idx, None, ...], mask_type=task_type, extra_kwargs=extra_kwargs_pos,
            kv_cache=self._kv_cache, cache_txt=True)
        if self.do_classifier_free_guidance:
            extra_kwargs_neg = {key: extra_kwargs[key][0, None, ...] for key in byt5}
            self._kv_cache_neg = self.transformer(
                bi_inference=False, ar_txt_inference=True, ar_vision_inference=False, timestep_txt=t_expand_txt,
                text_states=prompt_embeds[0, None, ...], encoder_attention_mask=prompt_mask[0, None, ...],
                vision_states=vision_states[0, None, ...], mask_type=task_type, extra_kwargs=extra_kwargs_neg,
                kv_cache=self._kv_cache_neg, cache_txt=True)
        selected_frame_indices = []
        for chunk_i in range(self.chunk_num):
            if chunk_i > 0:
                current_frame_idx = chunk_i * self.chunk_latent_frames
                selected_frame_indices = []
                for chunk_start_idx in range(current_frame_idx, current_frame_idx + self.chunk_latent_frames, 4):
                    selected_frame_indices += select_aligned_memory_frames(
                        viewmats[0].cpu().detach().numpy(), chunk_start_idx, memory_frames=20, temporal_context_size=12,
                        pred_latent_size=4, points_local=self.points_local, device=device)
                selected_frame_indices = sorted(list(set(selected_frame_indices)))
                to_remove = list(range(current_frame_idx, current_frame_idx + self.chunk_latent_frames))
                selected_frame_indices = [x for x in selected_frame_indices if x not in to_remove]
                context_latents_input = torch.concat([latents[:, :, selected_frame_indices],
                                                      cond_latents[:, :, selected_frame_indices]], dim=1)
                context_timestep = torch.full((len(selected_frame_indices),), stabilization_level - 1, device=device,
                                              dtype=timesteps.dtype)
                for name in ("_kv_cache", "_kv_cache_neg")[: 2 if self.do_classifier_free_guidance else 1]:
                    setattr(self, name, self.transformer(
                        bi_inference=False, ar_txt_inference=False, ar_vision_inference=True,
                        hidden_states=context_latents_input, timestep=context_timestep, timestep_r=None,
                        mask_type=task_type, return_dict=False,
                        viewmats=viewmats[:, selected_frame_indices].to(device).to(self.target_dtype),
                        Ks=Ks[:, selected_frame_indices].to(device).to(self.target_dtype),
                        action=action[:, selected_frame_indices].to(device).to(self.target_dtype),
                        kv_cache=getattr(self, name), cache_vision=True,
                        rope_temporal_size=context_latents_input.shape[2], start_rope_start_idx=0))
                self.scheduler.set_timesteps(self.num_inference_steps, device=device)
            start_idx = chunk_i * self.chunk_latent_frames
            end_idx = chunk_i * self.chunk_latent_frames + self.chunk_latent_frames
            for i, t in enumerate(timesteps):
                timestep_input = torch.full((self.chunk_latent_frames,), t, device=device, dtype=timesteps.dtype)
                latent_model_input = latents[:, :, start_idx:end_idx]
                latents_concat = torch.concat([latent_model_input, cond_latents[:, :, start_idx:end_idx]], dim=1)
                latents_concat = self.scheduler.scale_model_input(latents_concat, t)
                preds = [self.transformer(
                    bi_inference=False, ar_txt_inference=False, ar_vision_inference=True, hidden_states=latents_concat,
                    timestep=timestep_input, timestep_r=None, mask_type=task_type, return_dict=False,
                    viewmats=viewmats[:, start_idx:end_idx].to(device).to(self.target_dtype),
                    Ks=Ks[:, start_idx:end_idx].to(device).to(self.target_dtype),
                    action=action[:, start_idx:end_idx].to(device).to(self.target_dtype),
                    kv_cache=kv, cache_vision=False,
                    rope_temporal_size=latents_concat.shape[2] + len(selected_frame_indices),
                    start_rope_start_idx=len(selected_frame_indices))[0]
                    for kv in (self._kv_cache, self._kv_cache_neg)[: 2 if self.do_classifier_free_guidance else 1]]
                noise_pred = preds[0]
                if self.do_classifier_free_guidance:
                    noise_pred = preds[1] + self.guidance_scale * (noise_pred - preds[1])
                latent_model_input = self.scheduler.step(noise_pred, t, latent_model_input, return_dict=False)[0]
                latents[:, :, start_idx:end_idx] = latent_model_input[:, :, -self.chunk_latent_frames:]
        return latents

