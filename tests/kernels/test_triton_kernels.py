"""Every Triton kernel against its plain-torch twin, on fresh random inputs.

On a CPU machine the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest),
so shapes stay small; on a GPU the same tests run the compiled kernels (and GPU-only tests run
full shapes).
"""

import dataclasses
import itertools

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qkv import kernels  # noqa: E402
from qkv.dtypes import max_finite  # noqa: E402
from qkv.errors import BackendError, DTypeError, ShapeError  # noqa: E402
from qkv.kernels.quantize import HEADROOM, block_peaks  # noqa: E402
from qkv.kernels.triton import IMPLS  # noqa: E402
from qkv.kernels.triton.bits import EXACT_LAUNCH, divisor_parts, quotient  # noqa: E402
from qkv.kernels.triton.quantize import _row_multiplier  # noqa: E402
from qkv.kernels.triton.tiles import AssignTile  # noqa: E402
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
    q = AffineQuantizer(bits=bits, block=block, mode=mode, scale=scale).code_format(PACKING.build(packer).format)
    x = random_rows(bits * 100 + length, length=length)
    ref = kernels.quantize_pack(x, q, backend="torch")
    out = kernels.quantize_pack(x, q, backend="triton")
    assert torch.equal(out.codes, ref.codes)
    assert torch.equal(out.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    if ref.zeros is not None:
        assert torch.equal(out.zeros.view(torch.uint8), ref.zeros.view(torch.uint8))
    assert (out.mult is None) == (ref.mult is None) and (ref.mult is None or torch.equal(out.mult, ref.mult))


@triton.jit
def _divide(n_ptr, d_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p, f, inv = divisor_parts(tl.load(d_ptr + i))
    tl.store(out_ptr + i, quotient(tl.load(n_ptr + i), p, f, inv))


def test_quotient_is_ieee_division_over_its_range():
    """``bits.quotient`` (one division a divisor, then a product and two fused multiply-adds a
    value) against IEEE division, for divisors from subnormal to huge and quotients across the
    range its docstring states (2^-80 .. 2^20)."""
    g = gen(11)
    size = 1 << 14
    d = (torch.rand(size, generator=g, device=DEVICE, dtype=torch.float64) + 0.5) * torch.exp2(
        torch.randint(-149, 126, (size,), generator=g, device=DEVICE).double())
    d = d.float().clamp_min(2.0**-149)
    ratio = torch.exp2(torch.rand(size, generator=g, device=DEVICE, dtype=torch.float64) * 99 - 79.5)
    n = (ratio * d.double() * torch.where(torch.rand(size, generator=g, device=DEVICE) < 0.5, -1, 1)).float()
    inside = (n.double() / d.double()).abs()
    keep = (inside > 2.0**-80) & (inside < 2.0**20)
    assert int(keep.sum()) > size * 0.8 and bool((d < 2.0**-126).any())  # subnormal divisors too
    out = torch.empty_like(n)
    _divide[(size // 1024,)](n, d, out, BLOCK=1024, **EXACT_LAUNCH)  # as the quantize kernel is compiled
    assert torch.equal(out[keep], (n / d)[keep])


# Triton's interpreter converts fp32 to bf16 / fp16 with subnormals flushed to zero (a subnormal
# row's scales come out 0 there, not on a GPU): those formats' subnormal rows run on a GPU only
INTERPRETER_FLUSHES = pytest.mark.skipif(DEVICE == "cpu", reason="the interpreter flushes subnormal bf16/fp16")


@pytest.mark.parametrize("mode, scale", [("midrise", "fp32"), ("asym", "fp32"), ("sym", "fp8"), ("midrise", "fp16"),
                                         pytest.param("asym", "fp16", marks=INTERPRETER_FLUSHES),
                                         pytest.param("sym", "bf16", marks=INTERPRETER_FLUSHES)])
def test_quantize_pack_divides_as_the_reference_at_every_magnitude(mode, scale):
    """The kernel takes each value's quotient by its block's scale from one division a block and
    a correction by the exact remainder; the twin divides. Same codes for blocks of subnormal,
    tiny, ordinary and huge values, and for values just off the code boundaries (quotients that
    the plain product with a reciprocal rounds the other way)."""
    q = AffineQuantizer(bits=3, block=16, mode=mode, scale=scale).code_format(PACKING.build("u8msb").format)
    g = gen(7)
    x = torch.randn(2, 12, 64, generator=g, device=DEVICE)
    exps = torch.tensor([-149, -140, -127, -126, -100, -20, 0, 3, 20, 100, 118, 121], device=DEVICE)
    x = x * torch.exp2(exps.float()).view(1, -1, 1)  # one magnitude a row
    x[1, :, ::3] = x[1, :, ::3].sign() * x[1, :, ::3].abs().amax(-1, keepdim=True) * (
        torch.arange(22, device=DEVICE) % 7 + 0.5) / 8 * (1 + 2.0**-23)  # near the half-steps
    assert bool(x.isfinite().all())
    ref = kernels.quantize_pack(x, q, backend="torch")
    out = kernels.quantize_pack(x, q, backend="triton")
    assert_same_rows(out, ref)


@pytest.mark.parametrize("scale", ["fp32", "fp16", "bf16"])
def test_quantize_pack_zero_points_keep_the_sign_of_zero(scale):
    """Blocks whose lowest value is -0.0 (or a negative value that rounds to zero in the zero
    point's format) store the zero point the reference stores, sign included."""
    q = AffineQuantizer(bits=2, block=16, mode="asym", scale=scale).code_format(PACKING.build("u8msb").format)
    x = torch.zeros(1, 3, 32, device=DEVICE)
    x[0, 0] = -0.0
    x[0, 1, :16] = -0.0
    x[0, 1, 16:] = torch.linspace(-1e-30, 1.0, 16)
    x[0, 2, 3] = 1.0
    ref = kernels.quantize_pack(x, q, backend="torch")
    out = kernels.quantize_pack(x, q, backend="triton")
    assert bool(torch.signbit(ref.zeros[0, 0]).all())  # the case this is about
    assert_same_rows(out, ref)


def test_quantize_pack_short_rows_far_from_later_words():
    """16 five-bit codes in int32 words: the third word must not pick up code 0 (a shift by 64
    bits, undefined on GPUs, once leaked it into that word)."""
    q = AffineQuantizer(bits=5, block=1, mode="midrise").code_format(PACKING.build("i32lsb").format)
    x = torch.tensor([-1.0, -0.1616, -0.4591, 0.4326, -0.3826, -0.5521, -0.2697, -0.3750, -0.5608,
                      0.6595, 0.1401, 0.8733, 0.4916, -0.5310, 0.0309, 0.1463], device=DEVICE).view(1, 1, 16)
    ref = kernels.quantize_pack(x, q, backend="torch")
    out = kernels.quantize_pack(x, q, backend="triton")
    assert torch.equal(out.codes, ref.codes)


@pytest.mark.parametrize("mode, scale", [("sym", "fp16"), ("asym", "bf16"), ("midrise", "fp8")])
def test_row_multiplier_is_the_least_power_of_two_above_the_peak_in_both_twins(mode, scale):
    """Each row's multiplier is the least 2**e (e in [-126, 127]) at or above its peak over half the
    scale format's largest value, 1 for a zero row, alike in the Triton kernel and its twin: at an
    exact power of two, just above and below one, for tiny (a subnormal quotient) and huge rows."""
    q = AffineQuantizer(bits=4, block=16, mode=mode, scale=scale).code_format(PACKING.build("u8msb").format)
    limit = max_finite(q.scale_dtype) * HEADROOM
    x = torch.zeros(8, 2, 32, device=DEVICE)  # the multiplier is per (batch, head) row: one case each
    for row, value in enumerate([limit * 2.0**-3 * q.steps, limit * 2.0**-3 * q.steps * (1 + 2**-20),
                                 limit * 2.0**-3 * q.steps * (1 - 2**-20), 0.0, 3e-41, 2.0**120, 1.0, 5e-3]):
        x[row, 0, 0] = value  # blocks of one positive value and zeros: peak = value / steps
    ref = kernels.quantize_pack(x, q, backend="torch")
    out = kernels.quantize_pack(x, q, backend="triton")
    assert torch.equal(out.mult, ref.mult)
    peaks = block_peaks(x.unflatten(-1, (-1, q.block)), q).flatten(1).amax(-1).double()
    y = peaks / limit
    assert y[0] == 2.0**-3 and 0 < y[4] < 2.0**-126  # on a power of two; a subnormal quotient
    mult = ref.mult.double()
    mant, exp = torch.frexp(y)  # exact, where log2 on a GPU is not: y = mant * 2**exp, mant in [0.5, 1)
    wanted = torch.where(y > 0, torch.exp2((exp - (mant == 0.5).int()).clamp(-126, 127).double()), 1.0)
    assert torch.equal(mult, wanted), (mult, wanted)


@triton.jit
def _row_multipliers(part_ptr, out_ptr, tiles, LIMIT: tl.constexpr):
    n = tl.program_id(0)
    tl.store(out_ptr + n, _row_multiplier(part_ptr + n * tiles, tiles, LIMIT))


@pytest.mark.parametrize("tiles", [1025, 2049, 3000])
def test_row_multiplier_over_more_block_peak_tiles_than_one_load(tiles):
    """A row whose speculative pass leaves more than 1,024 tiles' block peaks (the settling
    programs' first load of them) still takes its multiplier from every tile: rows whose peak
    sits in the first load, in the last tile, and in a later load's first tile."""
    limit = 448.0
    part = torch.rand(3, tiles, generator=gen(7), device=DEVICE)
    part[1, -1] = 1e6
    part[2, 1024] = 3e4
    out = torch.empty(3, device=DEVICE)
    _row_multipliers[(3,)](part, out, tiles, LIMIT=limit)
    wanted = [2.0**e for e in (-8, 12, 7)]  # the least 2**e >= peak / limit: 1 / 448, 1e6 / 448, 3e4 / 448
    assert part[0].max() / limit <= wanted[0] and part[0].max() / limit > wanted[0] / 2
    assert out.tolist() == wanted


@pytest.mark.parametrize("mode", ["sym", "asym"])
def test_blocks_below_the_scale_formats_normal_range_under_the_multiplier_are_quantized_again(mode):
    """The Triton kernel quantizes every tile before it knows its row's multiplier, as the
    multiplier leaves a block whose scale stays in the format's normal range; blocks far below
    their row's peak (E4M3 subnormals under the multiplier) round otherwise, and their tiles are
    quantized again: the same codes, scales and zero points as the twin."""
    q = AffineQuantizer(bits=2, block=16, mode=mode, scale="fp8").code_format(PACKING.build("u8msb").format)
    x = torch.rand(2, 6, 64, generator=gen(11), device=DEVICE) + 0.1
    if mode == "asym":
        x = x - 0.6
    # a block a magnitude, 2^0 .. 2^-23 of the row's peak
    x = (x.view(2, 6, 4, 16) * torch.exp2(-torch.arange(24.0, device=DEVICE)).view(1, 6, 4, 1)).view(2, 6, 64)
    ref = kernels.quantize_pack(x, q, backend="torch")
    scale = ref.scales.float() * ref.mult.view(-1, 1, 1)
    raw = block_peaks(x.unflatten(-1, (-1, q.block)), q) if mode != "asym" else None
    if raw is not None:  # what the speculative pass took: the peak rounded up to E4M3's 4 significant bits
        mant, exp = torch.frexp(raw)
        wide = torch.ceil(mant * 16) / 16 * torch.exp2(exp.float())
        assert bool((wide != scale).any())  # the case this is about
    assert bool(((ref.scales.float() > 0) & (ref.scales.float() < 2.0**-6)).any())  # E4M3 subnormals
    assert_same_rows(kernels.quantize_pack(x, q, backend="triton"), ref)


def assert_same_rows(out, ref):
    assert torch.equal(out.codes, ref.codes)
    assert torch.equal(out.scales.view(torch.uint8), ref.scales.view(torch.uint8))
    assert (out.zeros is None) == (ref.zeros is None)
    if ref.zeros is not None:
        assert torch.equal(out.zeros.view(torch.uint8), ref.zeros.view(torch.uint8))
    assert (out.mult is None) == (ref.mult is None) and (ref.mult is None or torch.equal(out.mult, ref.mult))


def fused_inputs(seed, stages, dtype, axis, n=2, s=48, d=64):
    """Rows of x (token layout [n, s, d] as a strided view, or its channel transpose) and per-stage
    centroids / assignments of mixed dtypes, one assignment tensor a stride-0 view over n."""
    g = gen(seed)
    base = torch.randn(n, s + 3, d, generator=g, device=DEVICE) * 3
    base[1, 2, :16] *= 1e3  # an outlier block
    x = base.to(dtype)[:, :s]  # row stride d, batch stride (s + 3) d
    cent_dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16)
    assign_dtypes = (torch.uint8, torch.int64, torch.int16, torch.int32)
    cents, assigns = [], []
    for t in range(stages):
        c = 5 + 3 * t
        cents.append((torch.randn(n, c, d, generator=g, device=DEVICE) * 2).to(cent_dtypes[t]))
        a = torch.randint(0, c, (n, s), generator=g, device=DEVICE).to(assign_dtypes[t])
        assigns.append(a[:1].expand(n, -1) if t == 1 else a)
    if stages == 1:  # a token equal to its centroid: an all-zero residual row
        x[0, 1] = cents[0][0, assigns[0][0, 1].long()].to(dtype)
    return (x if axis == "token" else x.transpose(1, 2)), cents, assigns


FUSED_CASES = [  # stages, x dtype, (bits, mode, scale, packer), axis: a spread of every choice
    (1, torch.bfloat16, (2, "midrise", "fp8", "u8msb"), "token"),  # the qvg case
    (1, torch.float16, (2, "sym", "fp8", "u8msb"), "token"),
    (2, torch.float32, (4, "asym", "fp16", "i32lsb"), "token"),
    (3, torch.bfloat16, (3, "midrise", "bf16", "u8msb"), "token"),
    (4, torch.float32, (2, "asym", "fp32", "u8msb"), "token"),
    (0, torch.bfloat16, (2, "midrise", "fp8", "u8msb"), "token"),
    (1, torch.bfloat16, (2, "asym", "fp16", "i32lsb"), "channel"),
    (2, torch.float16, (5, "sym", "fp8", "i32lsb"), "channel"),
]


@pytest.mark.parametrize("stages, dtype, quant, axis", FUSED_CASES)
def test_fused_centroid_quantize_pack_matches_reference_exactly(stages, dtype, quant, axis):
    """quantize_pack(x, centroids, assignments) == quantize_pack(x - gathered centroids): Triton
    vs its twin, and the twin vs the explicit subtraction (the unfused path), bit for bit."""
    from qkv.quantizers.smoothing import subtract_centroids

    bits, mode, scale, packer = quant
    q = AffineQuantizer(bits=bits, block=16, mode=mode, scale=scale, axis=axis).code_format(PACKING.build(packer).format)
    rows, cents, assigns = fused_inputs(stages * 10 + bits, stages, dtype, axis)
    ref = kernels.quantize_pack(rows, q, centroids=cents, assignments=assigns, backend="torch")
    out = kernels.quantize_pack(rows, q, centroids=cents, assignments=assigns, backend="triton")
    assert_same_rows(out, ref)
    residual = rows if axis == "token" else rows.transpose(1, 2)  # token layout
    for c, a in zip(cents, assigns):
        residual = subtract_centroids(residual, c, a)  # what CentroidSmoother.forward does
    residual = residual.float() if axis == "token" else residual.float().transpose(1, 2).contiguous()
    assert_same_rows(ref, kernels.quantize_pack(residual, q, backend="torch"))


def test_fused_quantize_pack_rejects_bad_centroids():
    q = AffineQuantizer(bits=2, block=16).code_format(PACKING.build("u8msb").format)
    x, cents, assigns = fused_inputs(0, 2, torch.bfloat16, "token")
    for backend in ("torch", "triton"):
        with pytest.raises(ShapeError, match="2 stages of centroids but 1 of assignments"):
            kernels.quantize_pack(x, q, centroids=cents, assignments=assigns[:1], backend=backend)
        with pytest.raises(ShapeError, match=r"stage 0 centroids have shape \(2, 5, 32\), expected \[2, C, 64\]"):
            kernels.quantize_pack(x, q, centroids=[cents[0][..., :32]], assignments=assigns[:1], backend=backend)
        with pytest.raises(ShapeError, match=r"stage 1 assignments have shape \(2, 47\), expected \[2, 48\]"):
            short = [assigns[0], assigns[1][:, 1:]]
            kernels.quantize_pack(x, q, centroids=cents, assignments=short, backend=backend)
        with pytest.raises(DTypeError, match="integer"):
            kernels.quantize_pack(x, q, centroids=cents[:1], assignments=[assigns[0].float()], backend=backend)
        with pytest.raises(DTypeError, match="x has dtype torch.int32"):
            kernels.quantize_pack(x.int(), q, backend=backend)
    # more stages than one launch takes: the reference does them, the kernel says why not
    many = [cents[0]] * 5, [assigns[0]] * 5
    ref = kernels.quantize_pack(x, q, centroids=many[0], assignments=many[1], backend="torch")
    with pytest.raises(BackendError, match="5 stages"):
        kernels.quantize_pack(x, q, centroids=many[0], assignments=many[1], backend="triton")
    auto = kernels.quantize_pack(x, q, centroids=many[0], assignments=many[1], backend="auto")
    assert_same_rows(auto, ref)


@pytest.mark.parametrize("bits, mode, scale, packer", QUANT_CASES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("stages", [0, 1, 3])
def test_dequantize_matches_reference_exactly(bits, mode, scale, packer, axis, stages):
    q = AffineQuantizer(bits=bits, block=16, mode=mode, scale=scale, axis=axis).code_format(PACKING.build(packer).format)
    n, s, d = 2, 48, 32
    x = random_rows(bits + stages, n=n, r=s if axis == "token" else d, length=d if axis == "token" else s)
    rows = kernels.quantize_pack(x, q, backend="torch")
    g = gen(stages)
    cents = [torch.randn(n, 7, d, generator=g, device=DEVICE).bfloat16() for _ in range(stages)]
    assigns = [torch.randint(0, 7, (n, s), generator=g, device=DEVICE).to(torch.uint8) for _ in range(stages)]
    for out_dtype in (torch.float32, torch.bfloat16):
        ref = kernels.dequantize(rows, q, s, cents, assigns, out_dtype=out_dtype, backend="torch")
        out = kernels.dequantize(rows, q, s, cents, assigns, out_dtype=out_dtype, backend="triton")
        assert out.dtype == out_dtype and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_dequantize_saturates_a_16_bit_output_as_the_reference(axis, dtype):
    """Values past a bf16 or fp16 output's finite range (fp32 scales near its top, values around
    its largest where rounding decides) come out as the largest finite value of their sign, as
    qkv.dtypes.saturate gives them, never inf (on a GPU one saturating conversion a pair)."""
    q = AffineQuantizer(bits=2, block=16, mode="sym", scale="fp32", axis=axis).code_format(PACKING.build("u8msb").format)
    n, s, d = 2, 32, 32
    rows = kernels.quantize_pack(random_rows(5, n=n, r=s if axis == "token" else d, length=d if axis == "token" else s),
                                 q, backend="torch")
    top = max_finite(dtype)
    factors = torch.tensor([0.25, 0.4999, 0.5, 0.50001, 1.0, 1e-30], device=DEVICE) * top
    scales = factors[torch.arange(rows.scales.numel(), device=DEVICE) % len(factors)].view_as(rows.scales)
    rows = dataclasses.replace(rows, scales=scales)
    ref = kernels.dequantize(rows, q, s, [], [], out_dtype=dtype, backend="torch")
    out = kernels.dequantize(rows, q, s, [], [], out_dtype=dtype, backend="triton")
    assert torch.isfinite(ref).all() and (ref.float().abs() == top).any() and torch.equal(out, ref)


def test_dequantize_with_implicit_assignments_view():
    q = AffineQuantizer(bits=2, block=32).code_format(PACKING.build("u8msb").format)
    rows = kernels.quantize_pack(random_rows(3, r=40), q, backend="torch")
    cents = [torch.randn(2, 4, 64, device=DEVICE)]
    assign = (torch.arange(40, device=DEVICE) // 10).unsqueeze(0).expand(2, -1)  # stride 0 over rows
    ref = kernels.dequantize(rows, q, 40, cents, [assign], backend="torch")
    assert torch.equal(kernels.dequantize(rows, q, 40, cents, [assign], backend="triton"), ref)


def resident_only(monkeypatch, tile):
    """With a tile that keeps every centroid on chip (``waves``), the tiled kernel must not run."""
    from qkv.kernels.triton.kmeans import assign

    if tile is not None and tile.waves:
        monkeypatch.setattr(assign, "_assign_kernel", None)


# the device's tile (a program per token tile); every centroid kept on chip, 2 programs a row
# walking 5 token tiles (waves 3 over 2 rows)
ASSIGN_TILES = [None, AssignTile(32, 128, 4, waves=3)]


@pytest.mark.parametrize("d, c", [(16, 5), (64, 70), (128, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", ASSIGN_TILES)
def test_kmeans_assign_picks_the_nearest_bf16_rounded_centroid(d, c, dtype, tile, monkeypatch):
    from qkv.kernels.triton.kmeans.assign import assign_triton

    resident_only(monkeypatch, tile)
    g = gen(d + c)
    x = torch.randn(2, 150, d, generator=g, device=DEVICE).to(dtype)
    cents = torch.randn(2, c, d, generator=g, device=DEVICE)
    idx, dist = assign_triton(x, cents, tile=tile)  # read in its dtype
    rounded = cents.bfloat16().float()
    exact = torch.cdist(x.double(), rounded.double()).square()
    chosen = torch.gather(exact, 2, idx.unsqueeze(-1)).squeeze(-1)
    x_norm = x.double().norm(dim=-1)
    c_norm = cents.double().norm(dim=-1).max(-1, keepdim=True).values
    # the nearest rounded centroid up to fp32 summation order (bf16 tokens: exact products) or the
    # ~2^-16 split of fp32 tokens: near-ties may resolve differently
    tol = (1e-6 if dtype == torch.bfloat16 else 1e-4) * (x_norm + c_norm).square()
    assert bool((chosen - exact.min(-1).values <= tol).all())
    ref_idx, _ = kernels.kmeans_assign(x.float(), rounded, backend="torch")
    assert (idx == ref_idx).float().mean() > 0.99
    assert torch.allclose(dist.double(), chosen, rtol=1e-4, atol=1e-4)
    # against the fp32 centroids: off by at most the bf16 rounding's effect (docs/kernels.md)
    true = torch.cdist(x.double(), cents.double()).square()
    excess = torch.gather(true, 2, idx.unsqueeze(-1)).squeeze(-1) - true.min(-1).values
    assert bool((excess <= 2**-7 * c_norm * (x_norm + c_norm) + tol).all())


# equal centroids in different tiles / in one tile / in one tile kept on chip
@pytest.mark.parametrize("tile", [AssignTile(16, 16, 4), AssignTile(16, 64, 4), AssignTile(16, 64, 4, waves=1)])
def test_kmeans_assign_breaks_ties_toward_the_lower_index(tile, monkeypatch):
    """Tokens equal to centroids that repeat (repeated frames give equal tokens, so equal seeds)
    go to the first of the equal centroids, as the torch twin's argmin does, wherever the copies
    sit among the kernel's centroid tiles; the distance is 0."""
    from qkv.kernels.triton.kmeans.assign import assign_triton

    resident_only(monkeypatch, tile)
    g = gen(tile.clusters)
    cents = torch.randn(2, 40, 32, generator=g, device=DEVICE).bfloat16().float()
    cents[:, 37] = cents[:, 5]
    cents[:, 20] = cents[:, 19]
    x = cents[:, [37, 20, 19, 5, 3]].bfloat16()
    idx, dist = assign_triton(x, cents, tile=tile)
    ref_idx, _ = kernels.kmeans_assign(x, cents, backend="torch")
    assert idx.tolist() == ref_idx.tolist() == [[5, 19, 19, 5, 3]] * 2
    assert bool((dist.abs() <= 1e-5 * cents.square().sum(-1).max()).all())


@pytest.mark.parametrize("tile", [*ASSIGN_TILES, "sums"])
def test_kmeans_on_bad_values_keeps_every_index_in_range(tile, monkeypatch):
    """NaN and Inf tokens (a value check that reads its verdict after the encode refuses them
    then) still get centroid indices in range from every assignment kernel, and the far tokens of
    such distances are distinct tokens of the row: nothing the encode gathers next reads out of
    bounds."""
    from qkv.kernels.triton.kmeans.assign import assign_triton
    from qkv.kernels.triton.kmeans.far import far_tokens_triton

    sums = tile == "sums"
    tile = None if sums else tile
    resident_only(monkeypatch, tile)
    g = gen(23)
    x = torch.randn(2, 150, 64, generator=g, device=DEVICE)
    x[0, 3, 5] = float("nan")
    x[0, 90:] = float("nan")
    x[1, 7, 1] = float("inf")
    cents = torch.randn(2, 16 if sums else 40, 64, generator=g, device=DEVICE)
    idx, dist = assign_triton(x.bfloat16(), cents, sums=sums, tile=tile)[:2]
    assert bool(((idx >= 0) & (idx < cents.shape[1])).all())
    far = far_tokens_triton(dist, 8, 4)
    assert bool(((far >= 0) & (far < x.shape[1])).all())
    assert all(len(set(row)) == 8 for row in far.tolist())


@pytest.mark.parametrize("s", [40, 300])  # every token a candidate / candidates drawn by D^2
def test_kmeans_parallel_seeding_on_the_assign_kernel(s):
    """k-means|| seeding with its distances from the Triton assignment (bf16-rounded candidates):
    still min(C, S) distinct tokens of each row, and about as good a start as with the torch twin
    (the same draws; a near-tie that rounds the other way can change a later pick)."""
    from qkv.grouping.kmeans import _init_parallel

    x = torch.randn(2, s, 32, generator=gen(s), device=DEVICE)
    starts = {
        backend: _init_parallel(x, 16, torch.Generator(device=DEVICE).manual_seed(0), backend)
        for backend in ("triton", "torch")
    }
    same = (starts["triton"].unsqueeze(2) == x.unsqueeze(1)).all(-1)  # [N, C, S]
    assert bool((same.sum(-1) == 1).all()) and bool((same.sum(1) <= 1).all())
    cost = {b: kernels.kmeans_assign(x, c, backend="torch")[1].sum() for b, c in starts.items()}
    assert cost["triton"] <= 1.1 * cost["torch"]


KMEANSPP_SHAPES = [(2, 37, 8, 5), (3, 100, 16, 20), (1, 9, 4, 9)] + (
    [(64, 1024, 128, 256), (12, 4096, 128, 256)] if DEVICE == "cuda" else [(2, 300, 32, 48), (2, 300, 20, 48)])


def exponential(rounds, k, g):
    return torch.empty(rounds, k, device=DEVICE).exponential_(generator=g).clamp_min_(1e-30)


@pytest.mark.parametrize("n, k, d, c", KMEANSPP_SHAPES)
@pytest.mark.parametrize("spread", [2, 0])  # distinct points / a few values repeated: scores run out
@pytest.mark.parametrize("rounds", ["one pick each", "~8 picks each", "~32 picks each"])
@pytest.mark.parametrize("draws", ["exponential", "equal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeanspp_matches_reference_exactly(n, k, d, c, spread, rounds, draws, dtype):
    """Weighted D^2 sampling on integer-valued points (fp32 or bf16) and weights (every fp32 sum
    exact in any order: the running sums stay far below 2^24 even at 4,096 points of 128 dims;
    products exact in tf32 and bf16 too): the kernel's picks are the reference's, a pick a round
    (k-means++) or several (its products on the tensor cores where they fit; the last rounds'
    sizes differ), also once every score is 0 (points that
    coincide with picked ones, zero weights) and the first point not yet picked is taken, and
    with every draw 1 (keys are the integer scores: many equal keys, the lowest index first)."""
    g = gen(k + spread)
    points = torch.randint(-spread, spread + 1, (n, k, d), generator=g, device=DEVICE).to(dtype)
    weights = torch.randint(0, 4, (n, k), generator=g, device=DEVICE).float()
    weights[0, : k // 2] = 0
    per_round = {"one pick each": 1, "~8 picks each": 8, "~32 picks each": 32}[rounds]
    r = c if per_round == 1 else 1 + min(c - 1, max(1, c // per_round))
    draws = exponential(r, k, g) if draws == "exponential" else torch.ones(r, k, device=DEVICE)
    ref = kernels.kmeanspp(points, weights, draws, c, backend="torch")
    out = kernels.kmeanspp(points, weights, draws, c, backend="triton")
    assert torch.equal(out, ref)
    assert all(len(set(row.tolist())) == c for row in ref.cpu())


def test_kmeanspp_refuses_more_picks_than_points_and_mismatched_shapes():
    points, weights = torch.zeros(2, 5, 4, device=DEVICE), torch.ones(2, 5, device=DEVICE)
    draws = torch.ones(3, 5, device=DEVICE)
    with pytest.raises(ShapeError, match="6 picks from 5 points"):
        kernels.kmeanspp(points, weights, draws, 6)
    with pytest.raises(ShapeError, match="weights"):
        kernels.kmeanspp(points, weights[:, :4], draws, 3)
    with pytest.raises(ShapeError, match=r"draws \[R, K\]"):
        kernels.kmeanspp(points, weights, draws[:, :4], 3)
    with pytest.raises(ShapeError, match="3 rounds for 2 picks"):
        kernels.kmeanspp(points, weights, draws, 2)
    with pytest.raises(ShapeError, match="1 rounds for 3 picks"):
        kernels.kmeanspp(points, weights, draws[:1], 3)


FAR_SHAPES = [(3, 10, 4), (2, 1003, 5), (2, 2047, 256)] + (
    [(64, 29640, 256), (24, 37440, 256), (4, 400000, 1024)] if DEVICE == "cuda" else [(2, 9000, 256)])


@pytest.mark.parametrize("n, s, k", FAR_SHAPES)
def test_far_tokens_match_reference_exactly(n, s, k):
    """The far tokens (segment peaks, then a top-k of them) are the reference's, in its order, with
    equal distances across segments and within one, zeros and -0.0 among them."""
    g = gen(s + k)
    dist = torch.rand(n, s, generator=g, device=DEVICE)
    dist[0, ::3] = dist[0, 1]  # a third of the row at one distance: equal peaks everywhere
    dist[-1, : s // 2] = 0.0
    dist[-1, 1 : s // 2 : 5] = -0.0
    ref = kernels.kmeans_far(dist, k, 4, backend="torch")
    out = kernels.kmeans_far(dist, k, 4, backend="triton")
    assert torch.equal(out, ref)
    assert all(len(set(row.tolist())) == k for row in out.cpu())


def test_far_tokens_refuse_bad_arguments():
    dist = torch.rand(2, 50, device=DEVICE)
    for k, per_pick in ((0, 4), (51, 4), (3, 0), (2.0, 4), (True, 4)):
        with pytest.raises(ShapeError, match="kmeans_far"):
            kernels.kmeans_far(dist, k, per_pick)
    with pytest.raises(ShapeError, match="float32"):
        kernels.kmeans_far(dist.double(), 3, 4)
    with pytest.raises(ShapeError, match=r"\[N, S\]"):
        kernels.kmeans_far(dist[0], 3, 4)


@pytest.mark.parametrize("n, s, k", FAR_SHAPES[:3])
def test_far_tokens_only_for_rows_with_an_empty_cluster(n, s, k):
    """Given the clusters' sizes, a row without an empty cluster gets -1s (the kernels skip its
    search) and a row with one the far tokens it gets without sizes, on both backends."""
    dist = torch.rand(n, s, generator=gen(s), device=DEVICE)
    counts = torch.ones(n, 7, device=DEVICE)
    counts[0, 3] = 0  # row 0 has an empty cluster, the others none
    for backend in ("torch", "triton"):
        full = kernels.kmeans_far(dist, k, 4, backend=backend)
        out = kernels.kmeans_far(dist, k, 4, counts=counts, backend=backend)
        assert torch.equal(out[0], full[0]) and bool((out[1:] == -1).all())
    with pytest.raises(ShapeError, match="counts"):
        kernels.kmeans_far(dist, k, 4, counts=counts[:1])


def test_reseed_moves_empty_clusters_onto_far_tokens_in_order():
    """The j-th empty cluster of a row takes far[n, min(j, K - 1)] times the row's scale, in
    place, bit for bit alike on both backends; a row without an empty cluster is left as it is,
    its far tokens -1; bad shapes are refused."""
    g = gen(29)
    x = torch.randn(3, 50, 24, generator=g, device=DEVICE).bfloat16()
    means = torch.randn(3, 6, 24, generator=g, device=DEVICE)
    counts = torch.full((3, 6), 5.0, device=DEVICE)
    counts[0, [1, 4, 5]] = 0
    counts[2, 0] = 0
    far = torch.randint(0, 50, (3, 2), generator=g, device=DEVICE)
    far[1] = -1
    scale = torch.tensor([2.0**-3, 1.0, 2.0**5], device=DEVICE)
    want = means.clone()
    for c, j in ((1, 0), (4, 1), (5, 1)):  # the third empty cluster takes the last token
        want[0, c] = x[0, far[0, j]].float() * scale[0]
    want[2, 0] = x[2, far[2, 0]].float() * scale[2]
    for backend in ("torch", "triton"):
        out = means.clone()
        assert kernels.kmeans_reseed(out, counts, x, far, scale=scale, backend=backend) is out
        assert torch.equal(out, want)
    for args, match in (((means, counts[:, :5], x, far), "do not match"), ((means, counts, x[:, :, :8], far), "match"),
                        ((means, counts, x, far[:, :0]), "K >= 1"), ((means.double(), counts, x, far), "float32")):
        with pytest.raises(ShapeError, match=match):
            kernels.kmeans_reseed(*args)


def test_kmeanspp_on_float_points_picks_as_well_as_the_reference():
    """On float points the fp32 sums may round differently: the picks stay distinct and seed as
    well as the reference's (squared distance of every point to its nearest pick)."""
    g = gen(7)
    points = torch.randn(3, 200, 32, generator=g, device=DEVICE)
    weights = torch.ones(3, 200, device=DEVICE)
    draws = exponential(9, 200, g)
    cost = {}
    for backend in ("torch", "triton"):
        picks = kernels.kmeanspp(points, weights, draws, 24, backend=backend)
        assert all(len(set(row.tolist())) == 24 for row in picks.cpu())
        centres = torch.gather(points, 1, picks.unsqueeze(-1).expand(-1, -1, 32))
        cost[backend] = torch.cdist(points, centres).square().min(-1).values.sum()
    assert cost["triton"] <= 1.05 * cost["torch"], cost


@pytest.mark.parametrize("n, s, c", [(3, 300, 5), (2, 128, 256), (1, 1000, 300), (2, 77, 1), (1, 4000, 1024),
                                     (32, 64, 1024), (33, 50, 1024)])
def test_tokens_ordered_by_cluster_as_a_stable_sort_orders_them(n, s, c):
    """The sorted update's order: each row's cluster ids ascending plus n * C (int16 while N * C
    fits it: one flat sort; int32 beyond), the tokens as a stable sort of each row orders them, as
    positions in the flattened rows, and each cluster's first position (int32, the last S), with
    empty clusters and one cluster holding a third of a row."""
    from qkv.kernels.triton.kmeans.update import order_by_cluster

    a = torch.randint(0, c, (n, s), generator=gen(s + c), device=DEVICE)
    a[0, : s // 3] = c - 1
    a[-1, s // 2 :: 7] = 0
    keys, order, bounds = order_by_cluster(a, c)
    want_keys, want_order = torch.sort(a, dim=1, stable=True)
    rows = torch.arange(n, device=DEVICE).view(-1, 1)
    assert keys.dtype == (torch.int16 if n * c <= 1 << 15 else torch.int32) and bounds.dtype == torch.int32
    assert torch.equal(keys.long(), want_keys + rows * c) and torch.equal(order, want_order + rows * s)
    starts = torch.arange(c + 1, device=DEVICE).expand(n, -1).contiguous()
    assert torch.equal(bounds.long(), torch.searchsorted(want_keys, starts))
    # int32 assignments in rows of a wider buffer (row stride 2 S): the same order
    strided = order_by_cluster(torch.cat([a, a], 1).int()[:, :s], c)
    assert all(torch.equal(got, want) for got, want in zip(strided, (keys, order, bounds)))


@pytest.mark.parametrize("d, c", [(16, 4), (64, 40), (128, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeans_update_matches_reference(d, c, dtype):
    g = gen(d)
    x = torch.randn(3, 200, d, generator=g, device=DEVICE).to(dtype)
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
    # empty clusters (1, 2 and the last; 0 is not) move onto the re-seed tokens in order
    assign[:, 0] = 0
    assign[(assign == 1) | (assign == 2)] = 0
    reseed = torch.randint(0, 200, (3, 2), generator=g, device=DEVICE)
    ref, ref_counts = kernels.kmeans_update(x, assign, old, backend="torch")
    out, counts = kernels.kmeans_update(x, assign, old, backend="triton")
    ref = kernels.kmeans_reseed(ref, ref_counts, x, reseed, backend="torch")
    out = kernels.kmeans_reseed(out, counts, x, reseed, backend="triton")
    assert torch.equal(counts, ref_counts)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    rows = torch.arange(3, device=DEVICE)
    assert torch.equal(out[:, 1], x[rows, reseed[:, 0]].float())  # the first empty cluster
    assert torch.equal(out[:, -1], x[rows, reseed[:, 1]].float())  # later ones share the last token


@pytest.mark.parametrize("update", ["update_sorted", "update_onehot"])
def test_kmeans_update_unbalanced_clusters(update):
    """One cluster holds most tokens (its sorted tokens span several of the sorted update's runs,
    the last one shorter), others hold fewer tokens than a run, one none: same means and counts
    as the reference, by either way of summing (the dispatcher picks by the number of clusters)."""
    from qkv.kernels.triton.kmeans import update as tk
    from qkv.kernels.triton.kmeans.update import RUN_TOKENS

    g = gen(5)
    s = RUN_TOKENS * 3 + 17
    x = torch.randn(2, s, 32, generator=g, device=DEVICE).bfloat16()
    assign = torch.randint(1, 6, (2, s), generator=g, device=DEVICE)
    assign[:, : s - 12] = 0
    assign = assign[:, torch.randperm(s, generator=torch.Generator().manual_seed(1)).to(DEVICE)]
    old = torch.randn(2, 7, 32, generator=g, device=DEVICE)
    ref, ref_counts = kernels.kmeans_update(x, assign, old, backend="torch")
    out, counts = getattr(tk, update)(x, assign, old)
    assert torch.equal(counts, ref_counts)
    assert int(counts[:, 0].min()) == s - 12 and bool((counts[:, 6] == 0).all())
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sorted_kmeans_update_runs_of_many_clusters(dtype):
    """The sorted update where a run of sorted tokens holds many more clusters than one one-hot
    block (300 clusters of one or two tokens, some empty, between large ones that cross runs),
    fp16 and fp32 tokens summed from their bf16 parts, re-seeds and row scales: the reference's
    counts exactly and its means to fp32 summation order, the same bits on every run."""
    from qkv.kernels.triton.kmeans import update as tk
    from qkv.kernels.triton.kmeans.update import RUN_CLUSTERS, RUN_TOKENS

    c = 300
    g = gen(17)
    small = torch.arange(40, 40 + 2 * RUN_CLUSTERS * 4, device=DEVICE).repeat_interleave(2)[:-3]
    s = RUN_TOKENS * 2 + 3 * 50 + small.numel()
    body = torch.cat([torch.full((RUN_TOKENS + 30,), 7), torch.full((RUN_TOKENS - 30,), 200)]).to(DEVICE)
    tail = torch.randint(250, c, (s - body.numel() - small.numel(),), generator=g, device=DEVICE)
    assign = torch.cat([body, small, tail])
    assign = torch.stack([assign, assign.flip(0)])[:, torch.randperm(s, generator=torch.Generator().manual_seed(2))
                                                   .to(DEVICE)]
    x = (torch.randn(2, s, 64, generator=g, device=DEVICE) * 3).to(dtype)
    old = torch.randn(2, c, 64, generator=g, device=DEVICE)
    scale = torch.tensor([2.0**-30, 2.0**20], device=DEVICE)
    for kw in ({}, {"scale": scale}):
        ref, ref_counts = kernels.kmeans_update(x, assign, old, backend="torch", **kw)
        out, counts = tk.update_sorted(x, assign, old, **kw)
        assert torch.equal(counts, ref_counts)
        assert bool((counts == 0).any()) and int(counts.max()) > RUN_TOKENS
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert torch.equal(tk.update_sorted(x, assign, old, **kw)[0], out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, s, d, c", [(3, 200, 16, 4), (2, 300, 64, 40), (1, 520, 128, 300)])
def test_onehot_kmeans_update_matches_reference(dtype, n, s, d, c):
    """The one-hot tensor-core update: the reference's counts exactly, its means to fp32 summation
    order (the tokens' bf16 parts add up to them exactly), re-seeds and scales as the reference,
    the same bits on every run, a cluster holding most tokens included."""
    from qkv.kernels.triton.kmeans.sums import update_onehot
    from qkv.kernels.triton.tiles import UpdateTile

    g = gen(d + c)
    x = torch.randn(n, s, d, generator=g, device=DEVICE).to(dtype)
    assign = torch.randint(0, c - 1, (n, s), generator=g, device=DEVICE)  # cluster c-1 is empty
    assign[:, : s // 2] = 0  # most tokens in one cluster
    assign[(assign == 1) | (assign == 2)] = 0  # empty clusters 1 and 2 too
    old = torch.randn(n, c, d, generator=g, device=DEVICE)
    scale = torch.tensor([2.0**-40, 1.0, 2.0**30][:n], device=DEVICE)
    for kw in ({}, {"scale": scale}):
        ref, ref_counts = kernels.kmeans_update(x, assign, old, backend="torch", **kw)
        out, counts = update_onehot(x, assign, old, **kw)
        assert torch.equal(counts, ref_counts)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert torch.equal(update_onehot(x, assign, old, **kw)[0], out)
    assert torch.equal(out[:, 1], old[:, 1]) and torch.equal(out[:, -1], old[:, -1])  # empty: kept
    # another launch (blocks of 16 centroids, 32-token steps, the tokens split 8 ways): the same
    out, counts = update_onehot(x, assign, old, **kw, tile=UpdateTile(tokens=32, clusters=16, warps=4, waves=8))
    assert torch.equal(counts, ref_counts)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeans_ops_scale_each_row_as_they_read_it(dtype):
    """``scale`` (a power of two per row) gives on both backends what the same op gives on the
    scaled copy, for rows far outside fp32's safe range for squares (2**70 and 2**-70): the same
    assignments and counts, and on the CPU the same distances and means bit for bit; on a GPU the
    two inputs (bf16 tokens times a scale, fp32 scaled tokens) take different products, whose fp32
    sums may differ in their last bits."""
    g = gen(11)
    base = torch.randn(3, 120, 32, generator=g, device=DEVICE)
    x = (base * torch.tensor([2.0**70, 1.0, 2.0**-70], device=DEVICE).view(-1, 1, 1)).to(dtype)
    scale = torch.tensor([2.0**-70, 1.0, 2.0**70], device=DEVICE)
    scaled = x.float() * scale.view(-1, 1, 1)
    cents = torch.randn(3, 9, 32, generator=g, device=DEVICE)
    reseed = torch.randint(0, 120, (3, 2), generator=g, device=DEVICE)

    def same(a, b):
        return torch.equal(a, b) if DEVICE == "cpu" else torch.allclose(a, b, rtol=2.0**-20, atol=2.0**-20 * float(b.abs().max()))

    for backend in ("torch", "triton"):
        idx, dist = kernels.kmeans_assign(x, cents, scale=scale, backend=backend)
        ref_idx, ref_dist = kernels.kmeans_assign(scaled, cents, backend=backend)
        assert torch.equal(idx, ref_idx) and same(dist, ref_dist)
        assert bool(dist.isfinite().all())
        assign = idx.clone()
        assign[assign == 3] = 0  # an empty cluster: re-seeded from a token, scaled too
        out, counts = kernels.kmeans_update(x, assign, cents, scale=scale, backend=backend)
        ref, ref_counts = kernels.kmeans_update(scaled, assign, cents, backend=backend)
        out = kernels.kmeans_reseed(out, counts, x, reseed, scale=scale, backend=backend)
        ref = kernels.kmeans_reseed(ref, ref_counts, scaled, reseed, backend=backend)
        assert same(out, ref) and torch.equal(counts, ref_counts)


@pytest.mark.parametrize("tile", ASSIGN_TILES)
def test_kmeans_assign_takes_rows_of_factor_one_and_scaled_rows_in_one_call(tile, monkeypatch):
    """Rows of factor 1 and rows outside the safe range in one call (the on-chip kernel walks them
    in two copies of its loop): the assignments and distances of the scaled copy, bit for bit on
    the CPU."""
    from qkv.kernels.triton.kmeans.assign import assign_triton

    resident_only(monkeypatch, tile)
    g = gen(19)
    base = torch.randn(4, 150, 64, generator=g, device=DEVICE)
    x = (base * torch.tensor([2.0**70, 1.0, 1.0, 2.0**-70], device=DEVICE).view(-1, 1, 1)).bfloat16()
    scale = torch.tensor([2.0**-70, 1.0, 1.0, 2.0**70], device=DEVICE)
    cents = torch.randn(4, 40, 64, generator=g, device=DEVICE)
    idx, dist = assign_triton(x, cents, scale, tile=tile)
    ref_idx, ref_dist = assign_triton(x.float() * scale.view(-1, 1, 1), cents, tile=tile)
    assert torch.equal(idx, ref_idx)
    if DEVICE == "cpu":
        assert torch.equal(dist, ref_dist)
    else:  # bf16 tokens times a scale and fp32 scaled tokens take different products
        assert torch.allclose(dist, ref_dist, rtol=2.0**-20, atol=2.0**-20 * float(ref_dist.abs().max()))


# the device's tile, every centroid on chip, the pass that also sums (16 clusters); and the torch twin
@pytest.mark.parametrize("backend, tile, clusters", [("triton", None, 40), ("triton", ASSIGN_TILES[1], 40),
                                                     ("triton", "sums", 16), ("torch", None, 16)])
def test_kmeans_assign_measures_the_rows_peaks_and_redoes_the_rows_it_got_wrong(backend, tile, clusters,
                                                                                 monkeypatch):
    """A pass that takes every row's factor to be 1 gives each row's max |x| from its own read of
    the tokens (NaN and Inf propagating, as the value check's reduction does), and the pass run
    again with the factors those peaks give rewrites exactly the rows of another factor: they end
    as one pass with the factors gives them, bit for bit (sums included), while the rows of factor
    1 are not written at all."""
    from qkv.grouping.base import row_factor
    from qkv.kernels.triton.kmeans.assign import assign_triton

    sums = tile == "sums"
    tile = None if sums else tile
    resident_only(monkeypatch, tile)
    g = gen(clusters)
    x = torch.randn(7, 150, 64, generator=g, device=DEVICE)
    x[1] *= 2.0**70
    x[2] *= 2.0**-70
    x[3, 7, 5] = float("nan")
    x[4, 149, 63] = float("-inf")
    x[5] = 0.0
    x = x.bfloat16()
    cents = torch.randn(7, clusters, 64, generator=g, device=DEVICE)

    def run(x, cents, scale=None, **kw):
        if backend == "torch":
            return kernels.kmeans_assign(x, cents, scale=scale, sums=sums, backend="torch", **kw)
        return assign_triton(x, cents, scale, sums, tile=tile, **kw)

    *first, peaks = run(x, cents, peaks=True)
    expected = torch.linalg.vector_norm(x.flatten(1), ord=float("inf"), dim=-1, dtype=torch.float32)
    torch.testing.assert_close(peaks, expected, rtol=0, atol=0, equal_nan=True)
    factor = row_factor(x, peaks)
    assert factor[[0, 5]].tolist() == [1.0, 1.0] and factor[1] < 1 < factor[2]
    scaled = cents * factor.view(-1, 1, 1)
    direct = run(x, scaled, factor)
    first[0][factor == 1] = -7  # rows the redo must leave alone
    redone = run(x, scaled, factor, redo=tuple(first))
    again = factor != 1
    assert bool((redone[0][~again] == -7).all())
    flat = lambda out: [t for part in out for t in ((part,) if isinstance(part, torch.Tensor) else part)]  # noqa: E731
    for got, want in zip(flat(redone), flat(direct)):
        assert torch.equal(got[again], want[again])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kmeans_kernels_read_strided_rows_in_place(dtype):
    """The k-means kernels read tokens [N, S, D] with any strides along N and S (a slice of a
    longer buffer, keys and values stacked as one view), nothing copied, and give bit for bit what
    they give on a contiguous copy: assignment, both updates, re-seeds and row scales included."""
    from qkv.kernels.triton.kmeans.assign import assign_triton
    from qkv.kernels.triton.kmeans.sums import update_onehot
    from qkv.kernels.triton.kmeans.update import update_sorted

    g = gen(13)
    buffer = torch.randn(5, 2, 300, 32, generator=g, device=DEVICE).to(dtype)  # [2 x (b h), capacity, D]
    x = buffer[1:4, :, 40:240].flatten(0, 1)  # [6, 200, 32]: rows 600 apart, tokens 32 apart
    assert not x.is_contiguous() and x.stride() == (300 * 32, 32, 1)
    dense = x.contiguous()
    cents = torch.randn(6, 12, 32, generator=g, device=DEVICE)
    reseed = torch.randint(0, 200, (6, 2), generator=g, device=DEVICE)
    scale = torch.tensor([2.0**-40, 1.0, 2.0**30, 1.0, 1.0, 0.5], device=DEVICE)
    copies = []
    real_contiguous = torch.Tensor.contiguous
    with mock.patch.object(torch.Tensor, "contiguous",
                           lambda t, *a, **k: copies.append(t.data_ptr()) or real_contiguous(t, *a, **k)):
        got = [assign_triton(x, cents, scale)]
        assign = got[0][0].clone()
        assign[assign == 3] = 0  # an empty cluster, re-seeded
        got += [update(x, assign, cents, scale) for update in (update_sorted, update_onehot)]
        got += [(kernels.kmeans_reseed(got[1][0].clone(), got[1][1], x, reseed, scale=scale, backend="triton"),)]
    assert x.data_ptr() not in copies  # the tokens were read where they are
    want = [assign_triton(dense, cents, scale)]
    want += [update(dense, assign, cents, scale) for update in (update_sorted, update_onehot)]
    want += [(kernels.kmeans_reseed(want[1][0].clone(), want[1][1], dense, reseed, scale=scale, backend="triton"),)]
    for a, b in zip(got, want):
        assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.parametrize("d", [16, 32, 64, 128, 256, 512])  # square and oblong Kronecker factors
@pytest.mark.parametrize("rows", [111, 700, 1100])  # a program a row, tiles of 16 rows, of 64 (D <= 128)
def test_hadamard_matches_reference(d, rows):
    x = torch.randn(rows, d, generator=gen(d), device=DEVICE)
    ref = kernels.hadamard(x, backend="torch")
    out = kernels.hadamard(x, backend="triton")
    # split bf16 products (~2^-16 relative) and another summation order, relative to the row norm
    assert torch.allclose(out, ref, rtol=0, atol=3e-5 * x.norm(dim=-1).max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [16, 128])
def test_hadamard_of_half_rows_is_the_fp32_transform_rounded_once(d, dtype):
    """Queries against rotated keys: bf16/fp16 rows in, the fp32 transform rounded to nearest in
    their dtype out (within one unit in the last place where another summation order straddles
    a rounding boundary; on the interpreter's bf16 too, whose own conversion truncates)."""
    x = (torch.randn(2, 5, 3, d, generator=gen(d), device=DEVICE) * 4).to(dtype)
    out = kernels.hadamard(x, backend="triton")
    ref = kernels.hadamard(x.float(), backend="torch")
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    ulp = torch.finfo(dtype).eps * ref.abs() + torch.finfo(dtype).tiny
    err = (out.float() - ref).abs()
    assert bool((err <= ulp).all())
    assert (err > ulp / 2 * (1 + 2**-10)).float().mean() < 0.01  # rounded, not truncated


def test_unsupported_cases_raise_or_fall_back():
    x = torch.randn(1, 4, 48, device=DEVICE)
    q = AffineQuantizer(bits=2, block=48).code_format(PACKING.build("u8msb").format)
    with pytest.raises(BackendError, match="not a power of two"):
        kernels.quantize_pack(x, q, backend="triton")
    ref = kernels.quantize_pack(x, q, backend="torch")
    assert torch.equal(kernels.quantize_pack(x, q, backend="auto").codes, ref.codes)
    with pytest.raises(BackendError, match="valid backends"):
        kernels.hadamard(x, backend="cuda")
    wide, cents = torch.randn(1, 8, 512, device=DEVICE), torch.randn(1, 2, 512, device=DEVICE)
    with pytest.raises(BackendError, match="D=512 is larger than 256"):
        kernels.kmeans_assign(wide, cents, backend="triton")
    assert torch.equal(kernels.kmeans_assign(wide, cents)[0], kernels.kmeans_assign(wide, cents, backend="torch")[0])


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
        # the Triton assignment compares tokens with bf16-rounded centroids, so the two k-means runs
        # part at the first near-tie; at 8 clusters, 2 iterations and 4 stages the errors then
        # differ by up to 2.1% (measured)
        assert abs(err_a - err_b) <= 0.03 * err_a


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, s, d, c, fused_max", [(3, 300, 16, 4, None), (2, 520, 64, 32, None),
                                                   (2, 200, 64, 33, 32), (2, 520, 64, 40, None),
                                                   (1, 700, 128, 64, None), (2, 200, 64, 65, None)])
def test_assignment_gathers_the_update_sums_in_its_pass(dtype, n, s, d, c, fused_max, monkeypatch):
    """``sums=True``: up to FUSED_MAX_CLUSTERS clusters (``fused_max``: lowered, to check a count
    just past the limit) the assignment kernel also sums each cluster's tokens (several parts of a row,
    re-seeds, row scales, most tokens in one cluster): the same assignments and distances as
    without (fp16 and fp32 tokens: distances to within the rounding of their two products), the
    one-hot update's means bit for bit when launched alike (tokens per step, warps, waves: the
    device's tiles of the two kernels may differ), the reference's counts and its means to fp32
    summation order. Beyond, it leaves the sums to the update (None)."""
    from qkv.kernels.triton.kmeans import assign as tk
    from qkv.kernels.triton.kmeans.sums import update_onehot
    from qkv.kernels.triton.tiles import UpdateTile, tile_for

    if fused_max is not None:
        monkeypatch.setattr(tk, "FUSED_MAX_CLUSTERS", fused_max)
    FUSED_MAX_CLUSTERS = tk.FUSED_MAX_CLUSTERS
    g = gen(n + s + c)
    x = torch.randn(n, s, d, generator=g, device=DEVICE).to(dtype)
    x[:, : s // 2] = x[:, :1]  # most tokens nearest one centroid
    scale = torch.tensor([2.0**-40, 1.0, 2.0**30][:n], device=DEVICE)
    cent = torch.randn(n, c, d, generator=g, device=DEVICE) * scale.view(-1, 1, 1)  # where the scaled tokens are
    cent[:, -1] = 1e3 * scale.view(-1, 1)  # an empty cluster
    idx, dist, sums = kernels.kmeans_assign(x, cent, scale=scale, sums=True, backend="triton")
    plain = kernels.kmeans_assign(x, cent, scale=scale, backend="triton")
    assert torch.equal(idx, plain[0])
    if dtype == torch.bfloat16:
        assert torch.equal(dist, plain[1])
    else:  # two products a token (its high and low bf16 parts): a GPU kernel may add them in its own order
        terms = (x.float() * scale.view(-1, 1, 1)).square().sum(-1) + cent.square().sum(-1).amax(-1, keepdim=True)
        assert bool(((dist - plain[1]).abs() <= 1e-6 * terms).all())
    if c > FUSED_MAX_CLUSTERS:
        assert sums is None
        return
    assert sums.sums.shape[:3] == sums.counts.shape == (n, sums.sums.shape[1], c)
    out, counts = kernels.kmeans_update(x, idx, cent, scale=scale, sums=sums, backend="triton")
    ref, ref_counts = kernels.kmeans_update(x, idx, cent, scale=scale, backend="torch")
    assert torch.equal(counts, ref_counts) and bool((counts[:, -1] == 0).all())
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    launch = tile_for("assign_sums", x.device, c)
    alike = UpdateTile(tokens=launch.tokens, clusters=64, warps=launch.warps, waves=launch.waves)
    assert torch.equal(out, update_onehot(x, idx, cent, scale, tile=alike)[0])
    # the torch twin's sums, and either backend's update of the other's sums
    t_idx, _, t_sums = kernels.kmeans_assign(x, cent, scale=scale, sums=True, backend="torch")
    assert t_sums.sums.shape[1] == 1
    t_out, _ = kernels.kmeans_update(x, t_idx, cent, scale=scale, sums=t_sums, backend="torch")
    assert torch.equal(t_out, kernels.kmeans_update(x, t_idx, cent, scale=scale, backend="torch")[0])
    mixed, _ = kernels.kmeans_update(x, idx, cent, scale=scale, sums=sums, backend="torch")
    assert torch.allclose(mixed, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
