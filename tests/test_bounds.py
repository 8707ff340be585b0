"""Error bounds computed from compressed data alone (qkv.bounds and the components' rules)."""

import dataclasses
from typing import ClassVar

import pytest
import torch

import qkv
from qkv.bounds import SAFETY, Bound, BoundKind, KVBound, affine_error, kv_bound
from qkv.caches import TensorPolicy
from qkv.errors import BoundViolation, ConfigError
from qkv.quantizers import AffineQuantizer, CastQuantizer, Smoother


def kv(shape=(1, 2, 256, 64), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(shape[0], shape[1], 8, shape[3], generator=gen) * 4
    labels = torch.randint(0, 8, shape[:3], generator=gen)
    k = torch.gather(centres, 2, labels.unsqueeze(-1).expand(*shape)) + torch.randn(shape, generator=gen)
    return k.to(dtype), torch.randn(shape, generator=gen).to(dtype)


def roundtrip(policy, k, v):
    ckv = policy.compress(k, v)
    k_hat, v_hat = policy.decompress(ckv)
    return ckv, k_hat, v_hat, policy.error_bound(ckv, k_hat, v_hat)


@pytest.mark.parametrize("name", qkv.list_policies())
def test_every_preset_reports_a_bound_that_holds(name, tmp_path):
    policy = qkv.build_policy(name, **({"clusters": 16, "iters": 3} if "qvg" in name else {}))
    k, v = kv(dtype=torch.bfloat16)
    ckv, k_hat, v_hat, bound = roundtrip(policy, k, v)
    bound.check(k, v, k_hat, v_hat)
    kind = BoundKind.TOKEN_L2 if name == "quarot" else BoundKind.ELEMENT
    assert bound.k.kind is kind and bound.v.kind is kind
    assert tuple(bound.k.value.shape) == ((1, 2, 256) if name == "quarot" else (1, 2, 256, 64))
    # the bound depends on nothing but the stored data: a saved and reloaded copy reports it too
    ckv.save(tmp_path / "span.safetensors")
    again = kv_bound(qkv.CompressedKV.load(tmp_path / "span.safetensors"), k_hat=k_hat, v_hat=v_hat)
    assert torch.equal(again.k.value, bound.k.value) and torch.equal(again.v.value, bound.v.value)


@pytest.mark.parametrize("mode", ["sym", "midrise", "asym"])
@pytest.mark.parametrize("scale", ["fp32", "fp8"])
def test_affine_bound_is_attained(mode, scale):
    """Half a step of the stored scale: on data filling every block, some element errs by almost
    exactly that much, and none by more."""
    tensor = TensorPolicy(AffineQuantizer(bits=3, block=16, mode=mode, scale=scale))
    x = torch.rand(1, 4, 512, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ct = tensor.compress(x)
    x_hat = tensor.decompress(ct)
    bound = tensor.error_bound(ct, x_hat)
    ratio = bound.errors(x, x_hat) / bound.value
    assert float(ratio.max()) <= 1
    assert float(ratio.max()) > 0.99  # tight: the bound is not a generous multiple of the step
    step = (ct.scales.float() * ct.scale_mult.view(1, 4, 1, 1) if ct.scale_mult is not None else ct.scales).double()
    half = step.repeat_interleave(16, dim=-1) / 2
    assert bool((bound.value <= half * (1 + 2**-14)).all())  # fp32 rounding terms are tiny


def test_window_tokens_have_bound_zero():
    policy = qkv.build_policy("kivi")
    k, v = kv(shape=(1, 2, 300, 64))
    ckv, k_hat, v_hat, bound = roundtrip(policy, k, v)
    assert ckv.k.quantized_tokens == 160
    assert bool((bound.k.value[:, :, 160:] == 0).all()) and bool((bound.k.value[:, :, :160] > 0).all())
    assert bool((bound.v.value[:, :, 172:] == 0).all())
    bound.check(k, v, k_hat, v_hat)


def test_cast_bound_is_half_an_ulp():
    x = torch.randn(1, 2, 256, 64) * 3
    for storage, rel in (("bf16", 2**-8), ("fp16", 2**-11)):
        tensor = TensorPolicy(CastQuantizer(storage))
        ct = tensor.compress(x)
        x_hat = tensor.decompress(ct)
        bound = tensor.error_bound(ct, x_hat)
        stored = ct.codes.double().abs()
        tiny = {"bf16": 2**-133, "fp16": 2**-24}[storage] / 2
        assert torch.equal(bound.value, (stored * rel + tiny) * SAFETY)
        ratio = bound.errors(x, x_hat) / bound.value
        assert 0.95 < float(ratio.max()) <= 1
    exact = TensorPolicy(CastQuantizer("fp32"))
    half = x.half()
    assert float(exact.error_bound(exact.compress(half)).max()) == 0  # fp32 holds every fp16


def test_output_dtype_rounding_is_added_and_the_reconstruction_tightens_it():
    tensor = TensorPolicy(AffineQuantizer(bits=8, block=16, scale="fp32"))
    x = torch.randn(1, 1, 128, 64).bfloat16()
    ct = tensor.compress(x)
    x_hat = tensor.decompress(ct)
    with_hat, without = tensor.error_bound(ct, x_hat), tensor.error_bound(ct)
    fp32_part = TensorPolicy(AffineQuantizer(bits=8, block=16, scale="fp32")).error_bound(
        tensor.compress(x.float())
    )
    assert bool((with_hat.value <= without.value).all())
    assert bool((with_hat.value > fp32_part.value).all())  # bf16 rounding of the output is counted
    with_hat.check(x, x_hat)
    without.check(x, x_hat)
    # some elements err by more than the fp32 part allows: the output rounding must be in the bound
    assert bool((with_hat.errors(x, x_hat) > fp32_part.value).any())


def test_hadamard_bound_is_per_token_l2_and_tight():
    policy = qkv.build_policy("quarot")
    k, v = kv(shape=(1, 4, 512, 64))
    _, k_hat, v_hat, bound = roundtrip(policy, k, v)
    assert bound.k.kind is BoundKind.TOKEN_L2 and tuple(bound.k.value.shape) == (1, 4, 512)
    ratio = bound.k.errors(k, k_hat) / bound.k.value
    assert 0.5 < float(ratio.max()) <= 1
    # per element, a token bound is what the rotation allows; the element bound of the rotated
    # residual alone would not hold in the original basis
    bound.check(k, v, k_hat, v_hat)


def test_centroid_stages_pass_the_residual_bound_through():
    """qvg-pro's bound is the final residual's half step plus fp32 rounding: at most a hair above
    what the quantizer alone reports."""
    policy = qkv.build_policy("qvg-pro", clusters=16, iters=3)
    k, v = kv()
    ckv, k_hat, v_hat, bound = roundtrip(policy, k, v)
    alone = affine_error(ckv.k.format.codes, ckv.k.scales.flatten(0, 1), None, ckv.k.scale_mult.flatten())
    alone = alone.bound.value.view_as(bound.k.value)
    assert bool((bound.k.value >= alone).all())
    assert bool((bound.k.value <= alone + 1e-5 * (k.abs().double().max() + 1)).all())
    bound.check(k, v, k_hat, v_hat)


def test_an_overflowed_value_gives_inf_never_nan():
    """A value that overflowed its format (built-in paths saturate instead; a custom component's
    may not) reads as "no guarantee" (inf), never NaN, and inf accepts any reconstruction."""
    from qkv.bounds import rounding_error

    rounded = torch.tensor([65504.0, float("inf"), -float("inf")], dtype=torch.float16)
    term = rounding_error(rounded, torch.float32)
    bound = Bound.element(torch.zeros(3, dtype=torch.float64)).plus(term)
    assert bound.unbounded.tolist() == [False, True, True]
    assert not bool(torch.isnan(bound.value).any())
    bound.check(torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0]))


def test_saturated_reconstructions_keep_their_bound():
    """fp16 inputs at 65504 and fp16 centroids of inputs beyond it: the reconstruction and the
    stored centroids saturate to the finite range, and the bound holds everywhere."""
    for spec, x in (
        ("rtn", torch.full((1, 1, 8, 16), 65504.0, dtype=torch.float16)),
        ("kmeans(clusters=2,iters=1),centroid(dtype=fp16),int2(block=16)", torch.randn(1, 1, 32, 16) * 1e6),
    ):
        policy = qkv.build_policy(spec)
        _, x_hat, _, bound = roundtrip(policy, x, x)
        assert bool(torch.isfinite(x_hat).all()) and not bool(bound.k.unbounded.any())
        bound.k.check(x, x_hat)


@dataclasses.dataclass(frozen=True)
class SilentSmoother(Smoother):
    """Identity, but declares neither add-back nor rotation."""

    name: ClassVar[str] = "silent"

    def forward(self, x, groups, *, backend="auto"):
        return x, None


def test_a_smoother_that_declares_no_undo_is_refused():
    """Decoding and bounds read how a stage is undone from the data: a smoother must say it."""
    with pytest.raises(ConfigError, match="silent.*declares no undo"):
        TensorPolicy(AffineQuantizer(bits=2, block=16), smoothing=SilentSmoother())


def test_bound_api():
    x = torch.zeros(1, 1, 2, 4)
    x_hat = x.clone()
    x_hat[0, 0, 1, 2] = 0.5
    b = Bound.element(torch.full((1, 1, 2, 4), 0.25))
    assert b.violations(x, x_hat).sum() == 1 and b.max() == 0.25
    with pytest.raises(BoundViolation, match=r"1 of 8 elements.*worst at \[0, 0, 1, 2\].*x_hat = 0.5"):
        b.check(x, x_hat)
    token = b.as_token_l2()
    assert token.kind is BoundKind.TOKEN_L2 and torch.allclose(token.value, torch.full((1, 1, 2), 0.5).double())
    token.check(x, x_hat)  # ||(0, 0, 0.5, 0)|| = 0.5 <= 0.5
    nan = x_hat.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert b.violations(x, nan)[0, 0, 0, 0]  # NaN is never within a finite bound
    assert Bound.element(torch.tensor([float("nan")])).unbounded.all()  # a NaN bound reads as inf
    mixed = Bound.cat([token, Bound.element(torch.zeros(1, 1, 3, 4))])
    assert mixed.kind is BoundKind.TOKEN_L2 and tuple(mixed.value.shape) == (1, 1, 5)
    assert Bound.cat([b, Bound.none("because")]).reason == "because"
    with pytest.raises(BoundViolation, match="v:"):
        KVBound(b, b).check(x, x, x, x_hat)


def test_bound_of_data_from_another_policy_is_refused():
    k, v = kv(shape=(1, 1, 64, 32))
    ckv = qkv.build_policy("rtn").compress(k, v)
    with pytest.raises(ConfigError, match="compressed by"):
        qkv.build_policy("quarot").error_bound(ckv)
