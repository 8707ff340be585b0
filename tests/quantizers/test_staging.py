import dataclasses
from typing import ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv import kernels
from qkv.errors import ConfigError
from qkv.grouping import KMeansGrouper, NoGrouping
from qkv.kernels.quantize import dequantize_rows_torch
from qkv.quantizers import PACKING, AffineQuantizer, CentroidSmoother, ProgressiveResidual, SingleStage
from qkv.quantizers.smoothing import HadamardSmoother, NoSmoothing, gather_centroids, subtract_centroids


@given(stages=st.integers(1, 4), seed=st.integers(0, 10_000), clusters=st.integers(1, 16))
def test_progressive_reconstructs_when_final_quantization_is_lossless(stages, seed, clusters):
    """Without quantization, residual + every stage's centroids gives x back (fp32 rounding)."""
    x = torch.randn(2, 96, 8, generator=torch.Generator().manual_seed(seed)) * 3
    staging = SingleStage() if stages == 1 else ProgressiveResidual(stages=stages)
    smoother = CentroidSmoother(dtype="bf16")
    residual, stored = staging.run(x, KMeansGrouper(clusters=clusters, iters=3), smoother)
    assert len(stored) == stages
    rebuilt = residual
    for centroids, assign in reversed(stored):
        rebuilt = rebuilt + gather_centroids(centroids, assign)
    # each stage adds one fp32 rounding of the running sum: |error| <= stages * ulp(|x| + sum|c|)
    bound = stages * 2 * torch.finfo(torch.float32).eps * (x.abs() + 3 * residual.abs().max() + 20)
    assert bool(((rebuilt - x).abs() <= bound).all())


@pytest.mark.parametrize("preset", ["qvg", "qvg-pro", "qvg-ref"])
def test_policy_error_equals_final_residual_quantization_error(preset):
    policy = qkv.build_policy(preset, clusters=16, iters=4)
    tp = policy.k
    x = torch.randn(1, 2, 128, 64, generator=torch.Generator().manual_seed(1))
    ct = tp.compress(x)
    flat = x.view(2, 128, 64)
    residual, _ = tp.staging.run(flat, tp.grouping, tp.smoothing)
    fmt = tp.format(64).codes
    rows = kernels.quantize_pack(residual, fmt)
    quant_error = dequantize_rows_torch(rows, fmt, 64) - residual
    policy_error = (tp.decompress(ct) - x).view(2, 128, 64)
    assert torch.allclose(policy_error, quant_error, atol=1e-5)
    assert quant_error.abs().max() > 0  # the comparison is not vacuous


def test_staging_config_errors():
    with pytest.raises(ConfigError, match="single"):
        ProgressiveResidual(stages=1)
    with pytest.raises(ConfigError, match="centroid"):
        qkv.build_policy("hadamard,progressive(stages=2),int2")
    with pytest.raises(ConfigError, match="needs a grouping"):
        qkv.build_policy("centroid,int2")
    with pytest.raises(ConfigError, match="no effect"):
        qkv.build_policy("kmeans,int2")


def test_block_grouping_policy_stores_no_assignments():
    policy = qkv.build_policy("blocks(t=1,h=2,w=2,height=4,width=4),centroid,int2(block=16)")
    x = torch.randn(1, 2, 48, 32)
    ckv = policy.compress(x, x)
    assert ckv.k.component_nbytes()["assignments"] == 0
    assert ckv.k.stages[0].centroids.shape == (1, 2, 12, 32)
    k_hat, _ = policy.decompress(ckv)
    rtn = qkv.build_policy("int2(block=16)")
    r_hat, _ = rtn.decompress(rtn.compress(x, x))
    assert dataclasses.is_dataclass(ckv) and k_hat.shape == x.shape
    assert (k_hat - x).square().mean() < (r_hat - x).square().mean() * 1.5


@pytest.mark.parametrize("stages", [1, 3])
def test_defer_last_leaves_the_last_subtraction_to_quantize_pack(stages):
    x = torch.randn(2, 96, 16, generator=torch.Generator().manual_seed(stages)).bfloat16()
    staging = SingleStage() if stages == 1 else ProgressiveResidual(stages=stages)
    grouper, smoother = KMeansGrouper(clusters=5, iters=2), CentroidSmoother()
    assert staging.defers_last
    residual, stored = staging.run(x, grouper, smoother)
    before, deferred_stored, pending = staging.run(x, grouper, smoother, defer_last=True)
    if stages == 1:
        assert before is x  # the kernel reads the input itself, in its dtype
    assert before.dtype == (torch.bfloat16 if stages == 1 else torch.float32)
    assert torch.equal(subtract_centroids(before, *pending), residual)
    assert pending[0] is deferred_stored[-1][0] and pending[1] is deferred_stored[-1][1]  # compact
    for (c, a), (c2, a2) in zip(stored, deferred_stored):
        assert torch.equal(c, c2) and torch.equal(a, a2)
    q = AffineQuantizer(bits=2, block=16).code_format(PACKING.build("u8msb").format)
    fused = kernels.quantize_pack(before, q, centroids=[pending[0]], assignments=[pending[1]])
    plain = kernels.quantize_pack(residual, q)
    assert torch.equal(fused.codes, plain.codes)
    assert torch.equal(fused.scales.view(torch.uint8), plain.scales.view(torch.uint8))


def test_policy_hands_the_centroids_to_quantize_pack(monkeypatch):
    calls = []
    real = kernels.quantize_pack

    def spy(x, *args, centroids=(), assignments=(), **kwargs):
        calls.append((x.dtype, len(centroids)))
        return real(x, *args, centroids=centroids, assignments=assignments, **kwargs)

    monkeypatch.setattr(kernels, "quantize_pack", spy)
    x = torch.randn(1, 2, 64, 64).bfloat16()
    qkv.build_policy("qvg", clusters=4, iters=1).k.compress(x)
    qkv.build_policy("qvg-pro", clusters=4, iters=1).k.compress(x)
    qkv.build_policy("quarot").k.compress(x)
    qkv.build_policy("rtn").k.compress(x)
    # single stage: bf16 input and its centroids; progressive: the fp32 residual of stage 3; a
    # rotation is no subtraction (fp32 rotated input); no smoothing: the input as it is
    assert calls == [(torch.bfloat16, 1), (torch.float32, 1), (torch.float32, 0), (torch.bfloat16, 0)]


@dataclasses.dataclass(frozen=True)
class LoggedStaging(SingleStage):
    """Overrides run() without knowing defer_last."""

    name: ClassVar[str] = "logged"

    def run(self, x, grouper, smoother, warm=None, *, backend="auto"):
        return super().run(x, grouper, smoother, warm, backend=backend)


def test_smoothers_without_offsets_and_custom_stagings_keep_the_unfused_path():
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    for smoother in (HadamardSmoother(), NoSmoothing()):
        assert smoother.offsets(x, None) is None
        residual, _, pending = SingleStage().run(x, NoGrouping(), smoother, defer_last=True)
        assert pending is None and torch.equal(residual, SingleStage().run(x, NoGrouping(), smoother)[0])
    assert not LoggedStaging().defers_last
    tp = qkv.build_policy("kmeans(clusters=4,iters=1),centroid,int2(block=16)").k
    plain = tp.compress(x.view(1, 2, 64, 16))
    logged = dataclasses.replace(tp, staging=LoggedStaging()).compress(x.view(1, 2, 64, 16))
    assert torch.equal(plain.codes, logged.codes) and torch.equal(plain.scales, logged.scales)
