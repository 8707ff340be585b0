"""Hypothesis strategies for K/V tensors [B, H, S, D] that look like real caches.

Values are synthesized from a drawn seed and drawn features, so hypothesis shrinks toward plain,
small, structure-free inputs: a base (Gaussian, tokens clustered around a few centres like
redundant video patches, or smooth along tokens), channel outliers, an attention-sink token,
heads of very different scale, all-zero token/channel blocks, and an overall peak magnitude drawn
from just above the dtype's smallest subnormal up to its largest finite value (capped at 2**120,
what qkv accepts). :func:`clustered_tokens` is the one fixed (non-hypothesis) input: seeded
clustered tokens for comparisons that average over inputs.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from qkv.validation import MAX_MAGNITUDE

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 32, 64, 128)


@st.composite
def kv_shapes(
    draw,
    *,
    max_tokens: int = 4096,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    max_batch: int = 2,
    max_heads: int = 4,
) -> tuple[int, int, int, int]:
    """[B, H, S, D]: S from 1 to ``max_tokens`` (short spans drawn as often as long ones), D from
    ``head_dims``."""
    b = draw(st.integers(1, max_batch))
    h = draw(st.integers(1, max_heads))
    s = draw(st.one_of(st.integers(1, min(64, max_tokens)), st.integers(1, max_tokens)))
    return (b, h, s, draw(st.sampled_from(head_dims)))


def _limits(dtype: torch.dtype) -> tuple[int, int, float]:
    """(lowest peak exponent, highest, largest allowed magnitude) for ``dtype``."""
    finfo = torch.finfo(dtype)
    largest = min(float(finfo.max), MAX_MAGNITUDE)
    smallest = float(finfo.smallest_normal) * float(finfo.eps)  # smallest subnormal
    return math.ceil(math.log2(smallest)) + 4, math.floor(math.log2(largest)), largest


@st.composite
def kv_tensors(
    draw,
    shape: tuple[int, int, int, int] | None = None,
    dtype: torch.dtype | None = None,
    *,
    max_tokens: int = 4096,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    max_magnitude: float | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One K or V tensor ``shape`` (drawn by :func:`kv_shapes` if None) of ``dtype`` (drawn from
    fp32/fp16/bf16 if None), finite, with peak magnitude up to the dtype's largest value (or
    ``max_magnitude``)."""
    shape = tuple(shape) if shape is not None else draw(kv_shapes(max_tokens=max_tokens, head_dims=head_dims))
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    b, h, s, d = shape
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)

    base = draw(st.sampled_from(["gaussian", "clustered", "smooth"]))
    if base == "clustered":
        centres = torch.randn(b, h, draw(st.integers(1, 16)), d, generator=gen, dtype=torch.float64) * 4
        if draw(st.booleans()):  # runs of consecutive tokens share a centre (frames, patches)
            run = draw(st.integers(1, 64))
            labels = (torch.arange(s) // run) % centres.shape[2]
            labels = labels.expand(b, h, s)
        else:
            labels = torch.randint(centres.shape[2], (b, h, s), generator=gen)
        noise = draw(st.sampled_from([0.0, 1e-3, 0.05, 0.5]))  # 0: exact duplicates
        x = torch.gather(centres, 2, labels.unsqueeze(-1).expand(b, h, s, d)) + noise * x
    elif base == "smooth":  # slowly varying along tokens
        x = torch.cumsum(x, dim=2) / math.sqrt(s)
    if draw(st.booleans()):  # channel outliers (keys of real models have a few huge channels)
        count = draw(st.integers(1, min(4, d)))
        channels = torch.randperm(d, generator=gen)[:count]
        x[..., channels] = x[..., channels] * 10.0 ** draw(st.integers(1, 3)) + draw(st.sampled_from([0.0, 20.0]))
    if draw(st.booleans()):  # an attention-sink token far larger than the rest
        x[:, :, 0] *= 10.0 ** draw(st.integers(1, 3))
    if draw(st.booleans()):  # heads of very different scale
        x = x * torch.exp2(-torch.randint(0, 40, (b, h, 1, 1), generator=gen).double())
    zero = draw(st.sampled_from(["none", "tokens", "channels", "all"]))
    if zero == "tokens":
        start = draw(st.integers(0, s - 1))
        x[:, :, start : start + draw(st.integers(1, s))] = 0
    elif zero == "channels":
        start = draw(st.integers(0, d - 1))
        x[..., start : start + draw(st.integers(1, d))] = 0
    elif zero == "all":
        x.zero_()

    low, high, largest = _limits(dtype)
    if max_magnitude is not None:
        largest = min(largest, float(max_magnitude))
        high = min(high, math.floor(math.log2(largest)))
    exponent = draw(st.one_of(st.integers(-3, 6), st.integers(low, high)))
    peak = largest if exponent == high else 2.0**exponent
    top = x.abs().max()
    if top > 0:
        x = x * (peak / top)
    return x.clamp(-largest, largest).to(dtype).to(device)


@st.composite
def kv_pairs(
    draw,
    shape: tuple[int, int, int, int] | None = None,
    dtype: torch.dtype | None = None,
    *,
    max_tokens: int = 4096,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    max_magnitude: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v) of one shape and dtype, each drawn by :func:`kv_tensors` with its own features."""
    shape = tuple(shape) if shape is not None else draw(kv_shapes(max_tokens=max_tokens, head_dims=head_dims))
    dtype = dtype if dtype is not None else draw(st.sampled_from(DTYPES))
    one = kv_tensors(shape, dtype, max_magnitude=max_magnitude, device=device)
    return draw(one), draw(one)


def clustered_tokens(
    shape: tuple[int, int, int, int], *, clusters: int = 64, spread: float = 0.25, seed: int = 0
) -> torch.Tensor:
    """[B, H, S, D] fp32 tokens, each one of ``clusters`` random centres per head (standard
    normal) plus Gaussian noise of standard deviation ``spread``; the same tensor for the same
    arguments. The structure k-means smoothing exploits, for comparisons averaged over several
    fixed inputs (which a hypothesis strategy, shrinking toward plain inputs, does not give)."""
    b, h, s, d = shape
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, h, clusters, d, generator=gen)
    labels = torch.randint(clusters, (b, h, s, 1), generator=gen).expand(b, h, s, d)
    return torch.gather(centres, 2, labels) + spread * torch.randn(shape, generator=gen)
