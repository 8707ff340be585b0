"""Hypothesis strategies shared by the test suite."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from qkv.quantizers import AffineQuantizer

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@st.composite
def affine_quantizers(draw, axis: str | None = None) -> AffineQuantizer:
    mode = draw(st.sampled_from(["sym", "midrise", "asym"]))
    bits = draw(st.integers(2 if mode == "sym" else 1, 8))
    return AffineQuantizer(
        bits=bits,
        block=draw(st.sampled_from([4, 8, 16, 32])),
        mode=mode,
        axis=axis or draw(st.sampled_from(["token", "channel"])),
        scale=draw(st.sampled_from(["fp32", "fp16", "bf16", "fp8"])),
    )


@st.composite
def float_tensors(draw, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random tensors with a drawn magnitude (1e-30 .. 1e30 within the dtype), outlier channels
    and occasional all-zero rows."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    low = max(-30, int(torch.log10(torch.tensor(finfo.tiny)).item()) + 4)
    high = min(30, int(torch.log10(torch.tensor(finfo.max)).item()) - 3)
    magnitude = 10.0 ** draw(st.integers(low, high))
    x = torch.randn(shape, generator=gen) * magnitude
    if draw(st.booleans()):  # channel outliers
        x[..., 0] *= 20
    if draw(st.booleans()):  # an all-zero slice
        x[..., : max(1, shape[-2] // 4), :] = 0
    return x.to(dtype)
