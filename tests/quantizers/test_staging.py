import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv import kernels
from qkv.errors import ConfigError
from qkv.grouping import BlockGrouper, KMeansGrouper
from qkv.kernels.quantize import dequantize_rows_torch
from qkv.quantizers import CentroidSmoother, ProgressiveResidual, SingleStage
from qkv.quantizers.smoothing import gather_centroids


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
    rows = kernels.quantize_pack(residual, tp.quantizer, tp.packing)
    quant_error = dequantize_rows_torch(rows, tp.quantizer, tp.packing, 64) - residual
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
