"""Every Triton kernel against its plain-torch twin, on fresh random inputs.

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest),
so shapes stay small; on a GPU the same tests run the compiled kernels (and GPU-only tests run
full shapes).
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from qkv import kernels  # noqa: E402
from qkv.errors import BackendError  # noqa: E402
from qkv.kernels.triton import IMPLS  # noqa: E402
from qkv.quantizers import PACKING, AffineQuantizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gen(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def test_every_op_has_a_triton_kernel_and_a_torch_twin():
    assert set(IMPLS) == set(kernels.OPS) == set(kernels._TORCH)


QUANT_CASES = [
    (bits, mode, scale, packer)
    for bits, mode, scale, packer in itertools.product(
        (1, 2, 3, 4, 5, 8), ("sym", "midrise", "asym"), ("fp32", "fp16", "bf16", "fp8"), ("u8msb", "i32lsb")
    )
    if not (mode == "sym" and bits == 1)
]
# a spread-out subset keeps the interpreter (and the GPU's compile time) in check; every bits /
# mode / scale / packer value appears
QUANT_CASES = QUANT_CASES[::7] if DEVICE == "cpu" else QUANT_CASES[::3]


def random_rows(seed, n=2, r=5, length=64):
    x = torch.randn(n, r, length, generator=gen(seed), device=DEVICE) * 3
    x[0, 1] = 0  # an all-zero row of blocks
    x[1, 2, :16] *= 1e4  # an outlier block
    return x


@pytest.mark.parametrize("bits, mode, scale, packer", QUANT_CASES)
@pytest.mark.parametrize("length, block", [(64, 16), (96, 32)])
def test_quantize_pack_matches_reference_exactly(bits, mode, scale, packer, length, block):
    q = AffineQuantizer(bits=bits, block=block, mode=mode, scale=scale)
    p = PACKING.build(packer)
    x = random_rows(bits * 100 + length, length=length)
    ref = kernels.quantize_pack(x, q, p, backend="torch")
    out = kernels.quantize_pack(x, q, p, backend="triton")
    assert torch.equal(out.codes, ref.codes)
    assert torch.equal(out.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    if ref.zeros is not None:
        assert torch.equal(out.zeros.view(torch.uint8), ref.zeros.view(torch.uint8))
    assert (out.mult is None) == (ref.mult is None) and (ref.mult is None or torch.equal(out.mult, ref.mult))


def test_quantize_pack_short_rows_far_from_later_words():
    """16 five-bit codes in int32 words: the third word must not pick up code 0 (a shift by 64
    bits, undefined on GPUs, once leaked it into that word)."""
    q = AffineQuantizer(bits=5, block=1, mode="midrise")
    p = PACKING.build("i32lsb")
    x = torch.tensor([-1.0, -0.1616, -0.4591, 0.4326, -0.3826, -0.5521, -0.2697, -0.3750, -0.5608,
                      0.6595, 0.1401, 0.8733, 0.4916, -0.5310, 0.0309, 0.1463], device=DEVICE).view(1, 1, 16)
    ref = kernels.quantize_pack(x, q, p, backend="torch")
    out = kernels.quantize_pack(x, q, p, backend="triton")
    assert torch.equal(out.codes, ref.codes)


@pytest.mark.parametrize("bits, mode, scale, packer", QUANT_CASES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("stages", [0, 1, 3])
def test_dequantize_matches_reference_exactly(bits, mode, scale, packer, axis, stages):
    q = AffineQuantizer(bits=bits, block=16, mode=mode, scale=scale, axis=axis)
    p = PACKING.build(packer)
    n, s, d = 2, 48, 32
    x = random_rows(bits + stages, n=n, r=s if axis == "token" else d, length=d if axis == "token" else s)
    rows = kernels.quantize_pack(x, q, p, backend="torch")
    g = gen(stages)
    cents = [torch.randn(n, 7, d, generator=g, device=DEVICE).bfloat16() for _ in range(stages)]
    assigns = [torch.randint(0, 7, (n, s), generator=g, device=DEVICE).to(torch.uint8) for _ in range(stages)]
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = kernels.dequantize(rows, q, p, s, cents, assigns, out_dtype=out_dtype, backend="torch")
        out = kernels.dequantize(rows, q, p, s, cents, assigns, out_dtype=out_dtype, backend="triton")
        assert out.dtype == out_dtype and torch.equal(out, ref)


def test_dequantize_with_implicit_assignments_view():
    q = AffineQuantizer(bits=2, block=32)
    p = PACKING.build("u8msb")
    rows = kernels.quantize_pack(random_rows(3, r=40), q, p, backend="torch")
    cents = [torch.randn(2, 4, 64, device=DEVICE)]
    assign = (torch.arange(40, device=DEVICE) // 10).unsqueeze(0).expand(2, -1)  # stride 0 over rows
    ref = kernels.dequantize(rows, q, p, 40, cents, [assign], backend="torch")
    assert torch.equal(kernels.dequantize(rows, q, p, 40, cents, [assign], backend="triton"), ref)


@pytest.mark.parametrize("d, c", [(16, 5), (64, 70), (128, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeans_assign_picks_the_nearest_centroid(d, c, dtype):
    g = gen(d + c)
    x = torch.randn(2, 150, d, generator=g, device=DEVICE).to(dtype).float()
    cents = torch.randn(2, c, d, generator=g, device=DEVICE)
    ref_idx, ref_dist = kernels.kmeans_assign(x, cents, backend="torch")
    idx, dist = kernels.kmeans_assign(x.to(dtype), cents, backend="triton")  # read in its dtype
    exact = torch.cdist(x.double(), cents.double()).square()
    chosen = torch.gather(exact, 2, idx.unsqueeze(-1)).squeeze(-1)
    best = exact.min(-1).values
    # x.c with ~16 significant bits (split bf16 products): near-ties may resolve differently
    tol = 1e-4 * (x.square().sum(-1) + cents.square().sum(-1).max(-1, keepdim=True).values).double()
    assert bool((chosen - best <= tol).all())
    assert (idx == ref_idx).float().mean() > 0.99
    assert torch.allclose(dist.double(), chosen, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("d, c", [(16, 4), (64, 40)])
def test_kmeans_update_matches_reference(d, c):
    g = gen(d)
    x = torch.randn(3, 200, d, generator=g, device=DEVICE)
    assign = torch.randint(0, c - 1, (3, 200), generator=g, device=DEVICE)  # cluster c-1 is empty
    old = torch.randn(3, c, d, generator=g, device=DEVICE)
    ref, ref_counts = kernels.kmeans_update(x, assign, old, backend="torch")
    out, counts = kernels.kmeans_update(x, assign, old, backend="triton")
    assert torch.equal(counts, ref_counts)
    assert torch.equal(out[:, -1], old[:, -1])
    # same sums in a different order: a few fp32 ulps of the summed magnitudes
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    again, _ = kernels.kmeans_update(x, assign, old, backend="triton")
    assert torch.equal(again, out)  # deterministic


@pytest.mark.parametrize("d", [16, 64, 128])
def test_hadamard_matches_reference(d):
    x = torch.randn(3, 37, d, generator=gen(d), device=DEVICE)
    ref = kernels.hadamard(x, backend="torch")
    out = kernels.hadamard(x, backend="triton")
    # split bf16 products (~2^-16 relative) and another summation order, relative to the row norm
    assert torch.allclose(out, ref, rtol=0, atol=3e-5 * x.norm(dim=-1).max().item())


def test_unsupported_cases_raise_or_fall_back():
    x = torch.randn(1, 4, 48, device=DEVICE)
    q = AffineQuantizer(bits=2, block=48)
    p = PACKING.build("u8msb")
    with pytest.raises(BackendError, match="not a power of two"):
        kernels.quantize_pack(x, q, p, backend="triton")
    ref = kernels.quantize_pack(x, q, p, backend="torch")
    assert torch.equal(kernels.quantize_pack(x, q, p, backend="auto").codes, ref.codes)
    with pytest.raises(BackendError, match="valid backends"):
        kernels.hadamard(x, backend="cuda")


@pytest.mark.parametrize("preset", ["qvg", "qvg-pro", "kivi", "quarot", "rtn", "qvg-ref"])
def test_policies_give_the_same_result_on_both_backends(preset):
    import qkv

    policy = qkv.build_policy(preset, **({"clusters": 8, "iters": 2} if "qvg" in preset else {}))
    g = gen(1)
    k = (torch.randn(1, 2, 160, 64, generator=g, device=DEVICE) * 2).bfloat16()
    v = torch.randn(1, 2, 160, 64, generator=g, device=DEVICE).bfloat16()
    ref = policy.compress(k, v, backend="torch")
    out = policy.compress(k, v, backend="triton")
    ref_k, ref_v = policy.decompress(ref, backend="torch")
    out_k, out_v = policy.decompress(out, backend="triton")
    if "qvg" not in preset:  # no clustering: every stored byte is identical
        for a, b in zip(ref.k.tensors().values(), out.k.tensors().values()):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert torch.equal(ref_k, out_k) and torch.equal(ref_v, out_v)
    # decoding the same data is exact on both backends
    assert torch.equal(policy.decompress(ref, backend="triton")[0], ref_k)
    for x, a, b in ((k, ref_k, out_k), (v, ref_v, out_v)):
        err_a = (a.float() - x.float()).square().sum()
        err_b = (b.float() - x.float()).square().sum()
        assert abs(err_a - err_b) <= 0.02 * err_a
