import dataclasses

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from qkv import kernels
from qkv.bounds import affine_error
from qkv.errors import ConfigError, ShapeError
from qkv.kernels.quantize import block_params, dequantize_rows_torch
from qkv.quantizers import PACKING, QUANTIZERS, AffineQuantizer
from qkv.testing import components, kv_tensors


def roundtrip(x, q, packer_name="u8msb"):
    fmt = q.code_format(PACKING.build(packer_name).format)
    rows = kernels.quantize_pack(x, fmt, backend="torch")
    return rows, dequantize_rows_torch(rows, fmt, x.shape[-1])


def stored_step(rows, q):
    """The step each element was quantized with, from the stored scale alone: [N, R, L]."""
    m = rows.mult.view(-1, 1, 1) if rows.mult is not None else 1.0
    return (rows.scales.float() * m).repeat_interleave(q.block, dim=-1)


def token_rows(data):
    """(q, x): an affine quantizer along tokens and rows x [2, 5, L] (fp32) it can quantize."""
    length = data.draw(st.sampled_from([16, 32, 64]))
    q = data.draw(
        components("quantizer", names=[f"int{b}" for b in range(1, 9)], shape=(1, 2, 5, length)).filter(
            lambda q: q.axis == "token"
        )
    )
    return q, data.draw(kv_tensors((1, 2, 5, length), torch.float32))[0]


@given(data=st.data())
def test_roundtrip_within_half_step(data):
    q, x = token_rows(data)
    rows, x_hat = roundtrip(x, q, data.draw(st.sampled_from(["u8msb", "i32lsb"])))
    step = stored_step(rows, q).double()
    zero = 0.0 if rows.zeros is None else stored_step(dataclasses.replace(rows, scales=rows.zeros), q).double().abs()
    bound = affine_error(q.code_format(), rows.scales, rows.zeros, rows.mult).bound.value
    # half a step of the stored scale, plus fp32 rounding of the arithmetic (and of underflow)
    mult = 1.0 if rows.mult is None else rows.mult.double().clamp_min(1).view(-1, 1, 1)
    assert bool((bound - step / 2 <= 2**-19 * (2**q.bits * step + zero) + 2**-117 * mult).all())
    assert bool(((x_hat - x).abs().double() <= bound).all())
    assert bool(torch.isfinite(x_hat).all())


@given(data=st.data())
def test_stored_scale_rounding_is_bounded(data):
    """The stored scale exceeds the exact one by at most the format's rounding (one ulp)."""
    q, x = token_rows(data)
    x = x[:1, :3]
    blocks = rearrange(x, "n r (g b) -> n r g b", b=q.block)
    fmt = q.code_format()
    _, _, _, scale, zero = block_params(blocks, fmt)
    if fmt.has_zero:
        exact = (blocks.amax(-1) - blocks.amin(-1)) / fmt.steps
    else:
        exact = blocks.abs().amax(-1) / fmt.steps
    rel = {"fp32": 2**-23, "fp16": 2**-10, "bf16": 2**-7, "fp8": 2**-3}[q.scale]
    assert bool((scale >= exact * (1 - 1e-6)).all())
    if not fmt.has_zero:  # asym also widens by the zero point's rounding (checked by the bound)
        # blocks whose scale is a normal number of the format relative to the row's largest
        peak = exact.flatten(1).amax(-1).view(-1, 1, 1)
        normal = (exact >= peak * 2**-13) & (exact > 2**-120)
        assert bool((scale[normal] <= exact[normal] * (1 + rel) * (1 + 1e-6)).all())


def test_midrise_uses_all_levels_and_sym_three():
    x = torch.linspace(-1, 1, 64).view(1, 1, 64)
    for mode, levels in (("midrise", 4), ("sym", 3), ("asym", 4)):
        q = AffineQuantizer(bits=2, block=64, mode=mode, scale="fp32")
        rows, _ = roundtrip(x, q)
        codes = PACKING.build("u8msb").unpack(rows.codes, 2, 64)
        assert codes.unique().numel() == levels


def test_zero_block_and_extreme_magnitudes():
    for value in (0.0, 1e-30, 1e30, 3e36):
        x = torch.full((1, 2, 64), value)
        x[0, 1, ::2] *= -0.5
        for mode in ("sym", "midrise", "asym"):
            q = AffineQuantizer(bits=2, block=32, mode=mode, scale="fp8")
            rows, x_hat = roundtrip(x, q)
            assert bool(torch.isfinite(x_hat).all())
            assert bool(((x_hat - x).abs() <= stored_step(rows, q) / 2 * (1 + 1e-6)).all())
            if value == 0.0:
                assert torch.equal(x_hat, x)


def test_quantizer_config_errors():
    with pytest.raises(ConfigError, match="sym"):
        AffineQuantizer(bits=1, mode="sym")
    with pytest.raises(ConfigError, match="bits"):
        AffineQuantizer(bits=9)
    with pytest.raises(ConfigError, match="valid values"):
        AffineQuantizer(bits=2, scale="fp4")
    with pytest.raises(ShapeError, match="does not divide"):
        kernels.quantize_pack(torch.zeros(1, 1, 48), AffineQuantizer(bits=2, block=32).code_format())
    assert QUANTIZERS.build("int3(block=16,mode=asym)") == AffineQuantizer(bits=3, block=16, mode="asym")
