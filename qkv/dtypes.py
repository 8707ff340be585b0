"""Names of the float formats qkv stores, and directed rounding into them.

Scales are rounded *up* and asymmetric zero points *down* into their storage format, so the
quantization grid built from the stored values always covers the block: the code never has to be
clamped and the error stays within half a step of the stored scale.
"""

from __future__ import annotations

import torch

FLOAT_FORMATS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The integer type with the same width as each format: for non-negative floats, the bit pattern
# read as an integer is monotonic, so +1 / -1 moves to the next representable value.
_BITS_VIEW = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float8_e4m3fn: torch.uint8,
}
_SIGN_BIT = {
    torch.float32: -(2**31),
    torch.float16: -(2**15),
    torch.bfloat16: -(2**15),
    torch.float8_e4m3fn: 0x80,
}


def max_finite(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, values beyond its finite range set to its largest finite value (same
    sign) instead of overflowing to inf. For reconstructions of finite inputs (a quantized value
    may overshoot the input by up to its error bound) and for offsets whose exact value does not
    matter as long as the same value is added back."""
    if dtype == torch.float32 or x.dtype == dtype:
        return x.to(dtype)
    limit = max_finite(dtype)
    return x.float().clamp(-limit, limit).to(dtype)  # clamp in fp32: the limit is exact there


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` that is >= ``x`` (``x`` fp32, >= 0 and <= the dtype's max)."""
    y = x.to(dtype)
    low = y.float() < x  # no read-back to skip the fix-up: it would stall the GPU's queue
    bits = y.view(_BITS_VIEW[dtype])
    return torch.where(low, bits + 1, bits).view(dtype)


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest value of ``dtype`` that is <= ``x`` (``x`` fp32 within the dtype's finite range)."""
    y = x.to(dtype)
    high = y.float() > x  # no read-back to skip the fix-up: it would stall the GPU's queue
    view = _BITS_VIEW[dtype]
    bits = y.view(view)
    positive = y.float() > 0
    # y > 0: step toward zero; y < 0: step away from zero; y == 0 (so x < 0): -smallest subnormal
    zero_case = torch.full_like(bits, _SIGN_BIT[dtype] | 1)
    stepped = torch.where(positive, bits - 1, torch.where(y.float() < 0, bits + 1, zero_case))
    return torch.where(high, stepped, bits).view(dtype)


def compact_index_dtype(groups: int) -> torch.dtype:
    """Smallest integer dtype that holds group indices < ``groups``."""
    if groups <= 256:
        return torch.uint8
    return torch.int16 if groups <= 2**15 else torch.int32
