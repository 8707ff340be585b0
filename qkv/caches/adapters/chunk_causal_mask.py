"""A chunk-causal flex-attention ``BlockMask`` built blockwise.

A sequence of chunks where every token attends to its own chunk and the chunks before it (an
autoregressive video model's prefill over its clean context, e.g. AnyFlow-FAR's): flex
attention's ``create_block_mask`` evaluates the mask on every (query, key) pair before reducing it
to 128 x 128 blocks, memory that grows with the square of the sequence; this builds the same
``BlockMask`` from each block's first and last chunk.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from qkv.errors import CacheError

__all__ = ["MASK_BLOCK", "chunk_causal_block_mask"]

# flex attention's block: the sequence is padded to a multiple of it
MASK_BLOCK = 128


def chunk_causal_block_mask(chunk_tokens: list[int], device: torch.device | str | None = None) -> BlockMask:
    """The ``BlockMask`` of a sequence of chunks of ``chunk_tokens`` tokens each (a chunk may
    have none: a frame smaller than a coarse patch), padded to a multiple of 128: a token attends
    to every token of its own chunk and of the chunks before it, padding to nothing (as
    AnyFlow-FAR's cache-mode ``mask_mod``). Built from each 128-token block's first and last chunk
    (chunk indices never decrease along the sequence), without evaluating the
    mask on every (query, key) pair: a block of queries and one of keys are fully visible when both
    hold no padding and the queries' first chunk is at or after the keys' last, partly visible when
    both hold tokens and the queries' last chunk is at or after the keys' first. The blocks come in
    the order ``create_block_mask`` gives them (ascending, stable)."""
    if any(not isinstance(n, int) or n < 0 for n in chunk_tokens) or sum(chunk_tokens) < 1:
        raise CacheError("a chunk-causal mask needs token counts per chunk that are >= 0 and not all 0, "
                         f"got {chunk_tokens!r}")
    real = sum(chunk_tokens)
    padded = math.ceil(real / MASK_BLOCK) * MASK_BLOCK
    counts = torch.tensor(chunk_tokens, device=device)
    chunk = torch.zeros(padded, dtype=torch.int32, device=device)  # padding: chunk 0, as upstream
    chunk[:real] = torch.repeat_interleave(torch.arange(len(chunk_tokens), dtype=torch.int32, device=device), counts)
    start = torch.arange(0, padded, MASK_BLOCK, device=device)
    held = (real - start).clamp(0, MASK_BLOCK)  # real tokens per block
    first = chunk[start.clamp(max=real - 1)]
    last = chunk[(start + held - 1).clamp(0, real - 1)]
    whole = held == MASK_BLOCK
    full = whole[:, None] & whole[None, :] & (first[:, None] >= last[None, :])
    some = (held > 0)[:, None] & (held > 0)[None, :] & (last[:, None] >= first[None, :])

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = blocks.to(torch.int32)[None, None]
        return dense.sum(-1, dtype=torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (chunk[q_idx] >= chunk[kv_idx]) & (q_idx < real) & (kv_idx < real)

    return BlockMask.from_kv_blocks(*ordered(some & ~full), *ordered(full), BLOCK_SIZE=MASK_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(padded, padded))
