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

from qkv.caches.adapters.context_parallel import ContextParallel
from qkv.caches.adapters.handle import attend_parts
from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
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
        parallel = run.parallel
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))  # [B, S, H, D]
        if parallel is not None:  # this rank's tokens of every head -> the ring rank's tokens of this rank's heads
            query, key, value = (parallel.to_heads(t) for t in (query, key, value))

        positions = run.chunk_positions(query.shape[1])
        cos, sin = rope_at(run.rope, positions, run.grid)
        query = apply_rope(query, cos, sin)
        if run.key_rope == "after":
            key = apply_rope(key, cos, sin)
        key, value = (rearrange(t, "b s h d -> b h s d") for t in (key, value))

        cache = run.cache.layer(self.layer)
        query = rearrange(query, "b s h d -> b h s d")
        ring = parallel if parallel is not None and parallel.ring else None
        if run.key_rope == "after":
            # keys are cached with RoPE applied: attention reads the cache as it is (by default the
            # fused kernel over the compressed spans; the cache's ``attention`` option)
            if run.append:
                cache.append(key, value)
            if ring is None:
                out = cache.attend(query, extra=None if run.append else (key, value))
            else:
                out = attend_parts(cache.config, query, [cache] if run.append else [cache, (key, value)], ring)
        else:
            # RoPE goes on every read key at its absolute position, so the keys must be decompressed
            # and rotated first: read, rotate, then scaled_dot_product_attention
            if run.append:
                cache.append(key, value)
                keys, values = cache.read()
                key_pos = run.held_positions(cache)
            elif cache.layout is None:
                keys, values, key_pos = key, value, positions
            else:
                keys, values = cache.read()
                keys, values = torch.cat([keys, key], 2), torch.cat([values, value], 2)
                key_pos = torch.cat([run.held_positions(cache), positions])
            k_cos, k_sin = rope_at(run.rope, key_pos, run.grid)
            keys = rearrange(apply_rope(rearrange(keys, "b h s d -> b s h d"), k_cos, k_sin), "b s h d -> b h s d")
            if ring is None:
                out = F.scaled_dot_product_attention(query, keys, values)
            else:
                out = attend_parts(cache.config, query, [(keys, values)], ring)
        out = rearrange(out, "b h s d -> b s h d")
        if parallel is not None:
            out = parallel.to_tokens(out)
        return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(hidden_states)))


class WanRollout:
    """Installs :class:`WanCacheProcessor` on every ``blocks[i].attn1`` of a diffusers
    ``WanTransformer3DModel`` and runs it chunk by chunk with ``cache`` (a :class:`KVCache`, layer i
    = block i). Use as a context manager (restores the previous processors) or call :meth:`close`.

    Under diffusers' context parallelism (``model.enable_parallelism(...)``, before or after
    this) every rank runs the rollout with its own ``cache``: with Ulysses it holds the rank's
    heads, with a ring its shard of every chunk's tokens (:mod:`~qkv.caches.adapters.context_parallel`)."""

    def __init__(self, model, cache: KVCache, *, key_rope: str = "before") -> None:
        check_choice("WanRollout", "key_rope", key_rope, ("before", "after"))
        self.model, self.cache, self.key_rope = model, cache, key_rope
        self.rope = model.rope
        self.start_frame, self.append, self.grid = 0, True, (1, 1)
        self.parallel: ContextParallel | None = None
        self._held: list[torch.Tensor] = []  # under a ring: positions of the tokens this rank appended
        self._saved = [block.attn1.processor for block in model.blocks]
        for i, block in enumerate(model.blocks):
            block.attn1.set_processor(WanCacheProcessor(self, i))

    def chunk_positions(self, tokens: int) -> torch.Tensor:
        """Absolute positions [tokens] of the current chunk's tokens this rank holds (all of them
        unless a ring splits the chunk)."""
        first = self.start_frame * self.grid[0] * self.grid[1]
        if self.parallel is not None:
            first += self.parallel.first_token(tokens)
        return torch.arange(first, first + tokens)

    def held_positions(self, layer: LayerCache) -> torch.Tensor:
        """Absolute positions of ``layer``'s retained tokens, in read order (under a ring, of
        the shards this rank appended)."""
        local = layer.positions()
        if self.parallel is None or not self.parallel.ring:
            return local
        held = sum(p.numel() for p in self._held)
        if held != layer.seen:
            raise CacheError(f"wan: under a ring the rollout knows the positions of {held} of this rank's tokens, "
                             f"the cache holds {layer.seen}: give a ring rollout an empty cache")
        return torch.cat(self._held)[local]

    def _enter_call(self, frames: int, append: bool) -> None:
        """Read the model's context parallelism for this forward; under a ring, note the
        positions of the shard an appending forward stores."""
        self.parallel = ContextParallel.of(self.model, "wan")
        if self.parallel is None:
            return
        if self.parallel.ring and append:
            if self.cache.layer(0).seen == 0:  # a new video
                self._held = []
            tokens = frames * self.grid[0] * self.grid[1] // self.parallel.ring_world
            first = self.start_frame * self.grid[0] * self.grid[1] + self.parallel.first_token(tokens)
            self._held.append(torch.arange(first, first + tokens))

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
        p_t, p_h, p_w = self.model.config.patch_size
        self.grid = (latents.shape[3] // p_h, latents.shape[4] // p_w)
        self.start_frame, self.append = start_frame, append
        self._enter_call(latents.shape[2] // p_t, append)
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
