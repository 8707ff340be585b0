"""``diffusers`` WanTransformer3DModel with a qkv cache: chunk-wise (Self-Forcing style) rollout.

A Self-Forcing generator runs the Wan DiT on one chunk of latent frames at a time; every block's
self-attention appends the chunk's K/V to its cache once (in the clean, t=0 pass) and attends to
everything cached. diffusers' ``WanRotaryPosEmbed`` always starts at frame 0 and does not forward
``attention_kwargs`` to processors, so the per-call state (which frames, append or not) lives on a
:class:`WanRollout` that its processors hold.

    with WanRollout(model, qkv.KVCache("qvg", span_chunks=8, sink_chunks=1)) as run:
        for c in range(chunks):                               # latents [B, C, F, H, W]
            x = latents[:, :, 3 * c : 3 * c + 3]
            pred = run(noisy(x), timestep=t, text=text, start_frame=3 * c, append=False)
            run(x, timestep=0, text=text, start_frame=3 * c, append=True)   # fill the cache

:class:`WanCacheProcessor` (on every ``blocks[i].attn1``) computes q/k/v as ``WanAttnProcessor`` does,
applies RoPE with the frames offset by ``start_frame``, stores K before RoPE (``key_rope="before"``, as
the QVG Self-Forcing integration; RoPE is applied to the read history from each token's absolute
position, so sinks and evictions keep their positions) or after it (``"after"``, as Self-Forcing's
own cache), and attends the chunk's queries to [history, chunk]. With ``"after"`` the attention is
:meth:`LayerCache.attend`, which reads compressed spans as the cache's ``attention`` says (the fused
kernel by default; see docs/attention.md). With ``"before"`` every read key
needs RoPE at its absolute position, which the kernel does not apply, so that path decompresses the
history (``read``), rotates it and calls ``scaled_dot_product_attention``. With a lossless policy
(``"bf16"`` on a bf16 model) the rollout equals one full pass with a block-causal mask exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from qkv.caches.kvcache import KVCache
from qkv.component import check_choice
from qkv.errors import CacheError

__all__ = ["WanCacheProcessor", "WanRollout", "apply_rope", "rope_at", "rollout"]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on x [B, S, H, D] with cos/sin [1, S, 1, D] (diffusers' arithmetic)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def rope_at(rope, positions: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, S, 1, D] of ``rope`` (a ``WanRotaryPosEmbed``) at absolute token ``positions`` [S].

    Token p is frame ``p // (h * w)``, row ``p % (h * w) // w``, column ``p % w`` of a latent grid
    of ``grid = (h, w)`` patches per frame: the values ``WanRotaryPosEmbed`` gives that token when the
    video starts at frame 0, gathered from the same tables.
    """
    h, w = grid
    positions = positions.to(rope.freqs_cos.device)
    frame, rest = positions // (h * w), positions % (h * w)
    if int(frame.max()) >= rope.freqs_cos.shape[0]:
        raise CacheError(f"frame {int(frame.max())} is beyond the RoPE table ({rope.freqs_cos.shape[0]} positions)")
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t, r, c = table.split(sizes, dim=1)
        out.append(torch.cat([t[frame], r[rest // w], c[rest % w]], dim=-1)[None, :, None, :])
    return out[0], out[1]


class WanCacheProcessor:
    """Self-attention (``attn1``) processor of one Wan block, reading and writing ``rollout.cache``."""

    def __init__(self, rollout: "WanRollout", layer: int) -> None:
        self.rollout, self.layer = rollout, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise CacheError("WanCacheProcessor is for unmasked self-attention (attn1) only")
        run = self.rollout
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S, H, D]

        positions = run.chunk_positions(query.shape[1])
        cos, sin = rope_at(run.rope, positions, run.grid)
        query = apply_rope(query, cos, sin)
        if run.key_rope == "after":
            key = apply_rope(key, cos, sin)
        key, value = (rearrange(t, "b s h d -> b h s d") for t in (key, value))

        cache = run.cache.layer(self.layer)
        query = rearrange(query, "b s h d -> b h s d")
        if run.key_rope == "after":
            # keys are cached with RoPE applied: attention reads the cache as it is (by default the
            # fused kernel over the compressed spans; the cache's ``attention`` option)
            if run.append:
                cache.append(key, value)
            out = cache.attend(query, extra=None if run.append else (key, value))
        else:
            # RoPE goes on every read key at its absolute position, so the keys must be decompressed
            # and rotated first: read, rotate, then scaled_dot_product_attention
            if run.append:
                cache.append(key, value)
                keys, values = cache.read()
                key_pos = cache.positions()
            elif cache.layout is None:
                keys, values, key_pos = key, value, positions
            else:
                keys, values = cache.read()
                keys, values = torch.cat([keys, key], 2), torch.cat([values, value], 2)
                key_pos = torch.cat([cache.positions(), positions])
            k_cos, k_sin = rope_at(run.rope, key_pos, run.grid)
            keys = rearrange(apply_rope(rearrange(keys, "b h s d -> b s h d"), k_cos, k_sin), "b s h d -> b h s d")
            out = F.scaled_dot_product_attention(query, keys, values)
        out = rearrange(out, "b h s d -> b s (h d)").type_as(hidden_states)
        return attn.to_out[1](attn.to_out[0](out))


class WanRollout:
    """Installs :class:`WanCacheProcessor` on every ``blocks[i].attn1`` of a diffusers
    ``WanTransformer3DModel`` and runs it chunk by chunk with ``cache`` (a :class:`KVCache`, layer i
    = block i). Use as a context manager (restores the previous processors) or call :meth:`close`."""

    def __init__(self, model, cache: KVCache, *, key_rope: str = "before") -> None:
        check_choice("WanRollout", "key_rope", key_rope, ("before", "after"))
        self.model, self.cache, self.key_rope = model, cache, key_rope
        self.rope = model.rope
        self.start_frame, self.append, self.grid = 0, True, (1, 1)
        self._saved = [block.attn1.processor for block in model.blocks]
        for i, block in enumerate(model.blocks):
            block.attn1.set_processor(WanCacheProcessor(self, i))

    def chunk_positions(self, tokens: int) -> torch.Tensor:
        """Absolute positions [tokens] of the current chunk's tokens."""
        first = self.start_frame * self.grid[0] * self.grid[1]
        return torch.arange(first, first + tokens)

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        *,
        timestep: int | float | torch.Tensor,
        text: torch.Tensor,
        start_frame: int,
        append: bool,
    ) -> torch.Tensor:
        """Run the model on one chunk ``latents`` [B, C, F, H, W] whose first frame is video frame
        ``start_frame``; ``append`` stores its K/V in the cache (the clean pass), otherwise it only
        reads (a denoising step). ``text``: encoder hidden states [B, L, text_dim]. Returns the
        model output [B, C_out, F, H, W]."""
        _, p_h, p_w = self.model.config.patch_size
        self.grid = (latents.shape[3] // p_h, latents.shape[4] // p_w)
        self.start_frame, self.append = start_frame, append
        if not torch.is_tensor(timestep):
            timestep = torch.full((latents.shape[0],), timestep, device=latents.device)
        return self.model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

    def close(self) -> None:
        for block, processor in zip(self.model.blocks, self._saved):
            block.attn1.set_processor(processor)

    def __enter__(self) -> "WanRollout":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def rollout(
    model,
    cache: KVCache,
    latents: torch.Tensor,
    text: torch.Tensor,
    *,
    frames_per_chunk: int,
    noisy: torch.Tensor | None = None,
    timestep: int = 0,
    key_rope: str = "before",
) -> torch.Tensor:
    """A teacher-forced Self-Forcing style rollout over ``latents`` [B, C, F, H, W].

    Per chunk of ``frames_per_chunk`` frames: if ``noisy`` (same shape) is given, one denoising
    forward on it at ``timestep`` that reads the cache (its output is returned for that chunk);
    then the clean forward on ``latents`` at t=0 that appends the chunk's K/V (its output is
    returned when ``noisy`` is None). Returns the outputs of all chunks, concatenated along frames.
    """
    frames = latents.shape[2]
    outputs = []
    with WanRollout(model, cache, key_rope=key_rope) as run:
        for f0 in range(0, frames, frames_per_chunk):
            clean = latents[:, :, f0 : f0 + frames_per_chunk]
            if noisy is not None:
                outputs.append(run(noisy[:, :, f0 : f0 + frames_per_chunk], timestep=timestep, text=text,
                                   start_frame=f0, append=False))
            out = run(clean, timestep=0, text=text, start_frame=f0, append=True)
            if noisy is None:
                outputs.append(out)
    return torch.cat(outputs, dim=2)
