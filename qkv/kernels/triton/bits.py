"""@triton.jit helpers shared by the kernels: bit-packing, directed float rounding and exact
bf16 tensor-core products.

Everything here mirrors a plain-torch function exactly (same results bit for bit):
``pack_word``/``unpack_code`` mirror :mod:`qkv.kernels.packing`, ``round_up`` /
``round_down`` mirror :mod:`qkv.dtypes`, ``nearest_int`` mirrors ``torch.round``.
"""

import math

import triton
import triton.language as tl

# Smoothing stages one launch subtracts (quantize+pack) or adds back (dequantize, attention);
# deeper formats take the plain-torch path.
LAUNCH_STAGES = 4

# Launch options of the kernels that reproduce the torch reference bit for bit: no fused
# multiply-adds but the ones written out, and libdevice (div_rn, floor, ceil) without
# flush-to-zero: Triton's default links libdevice's flushing variants, which read a subnormal
# input or result as zero where torch's kernels keep it.
EXACT_LAUNCH = {"enable_fp_fusion": False, "enable_reflect_ftz": False}


@triton.jit
def pack_word(codes, K: tl.constexpr, BITS: tl.constexpr, WORD: tl.constexpr, MSB: tl.constexpr):
    """Word ``K`` of each group: ``codes`` [R, NG, WORD] int64 (a group of WORD codes fills BITS
    words); returns [R, NG] int64 holding the word's WORD bits."""
    j = tl.arange(0, WORD)
    if MSB:
        shift = WORD * (K + 1) - (j + 1) * BITS  # code j's LSB lands at this bit of word K
    else:
        shift = j * BITS - WORD * K
    # codes that do not reach this word contribute nothing; their shifts are never applied (a
    # 64-bit shift by 64 or more is undefined on GPUs)
    reach = (shift > -BITS) & (shift < WORD)
    left = tl.where(reach & (shift > 0), shift, 0)
    right = tl.where(reach & (shift < 0), -shift, 0)
    part = ((codes << left[None, None, :]) >> right[None, None, :]) & ((1 << WORD) - 1)
    part = tl.where(reach[None, None, :], part, 0)
    return tl.sum(part, axis=2)  # fields do not overlap: the sum is their OR


@triton.jit
def unpack_code(row_ptr, col, mask, BITS: tl.constexpr, WORD: tl.constexpr, MSB: tl.constexpr):
    """Code number ``col`` (any shape) of the packed row starting at ``row_ptr`` (int64 result)."""
    bit = col * BITS
    k0 = bit // WORD
    off = bit % WORD
    wmask = (1 << WORD) - 1
    w0 = tl.load(row_ptr + k0, mask=mask, other=0).to(tl.int64) & wmask
    w1 = tl.load(row_ptr + k0 + 1, mask=mask & (off + BITS > WORD), other=0).to(tl.int64) & wmask
    if MSB:
        code = (((w0 << WORD) | w1) >> (2 * WORD - off - BITS)) & ((1 << BITS) - 1)
    else:
        code = ((w0 | (w1 << WORD)) >> off) & ((1 << BITS) - 1)
    return code


@triton.jit
def _exp2_int(k):
    """2**k as fp32 for integer k in [-149, 127] (built from the bits: exact, no libm)."""
    normal = (k + 127).to(tl.int32) << 23
    sub = (1 << tl.maximum(k + 149, 0).to(tl.int32))
    return tl.where(k >= -126, normal, sub).to(tl.float32, bitcast=True)


@triton.jit
def _in_quanta(a, FMT: tl.constexpr, WIDE: tl.constexpr):
    """(a over the spacing q of format FMT (1 fp16, 2 bf16, 3 fp8 E4M3) around a >= 0, q): the
    quotient correctly rounded. q is a power of two, so the quotient is a product with 1 / q: for
    fp16 and fp8 one (2^-125 .. 2^24: a float, so the product rounds as the division does); where
    the spacing reaches 2^-133 (bf16, and WIDE), whose reciprocal is not a float, two products by
    its halves (each at most 2^68, the first one's result a normal float: exact), no division.
    WIDE: the format's mantissa with fp32's exponents (no subnormals above fp32's, no largest
    value): what the format gives a value times any power of two that brings it into the format's
    normal range."""
    if FMT == 1:
        MANT: tl.constexpr = 10
        EMIN: tl.constexpr = -14
    elif FMT == 2:
        MANT: tl.constexpr = 7
        EMIN: tl.constexpr = -126
    else:
        MANT: tl.constexpr = 3
        EMIN: tl.constexpr = -6
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    if WIDE:
        k = tl.maximum(e, -126) - MANT
    else:
        k = tl.maximum(e, EMIN) - MANT
    q = _exp2_int(k)
    if FMT == 2 or WIDE:
        half = (-k) >> 1
        over = (a * _exp2_int(half)) * _exp2_int(-k - half)
    else:
        over = a * _exp2_int(-k)
    return over, q


# Directed rounding computed in fp32 arithmetic (a multiple of the format's spacing, which is
# exact), so it does not depend on how a backend converts floats; storing the result in the
# format is then exact.
@triton.jit
def round_up(v, FMT: tl.constexpr, WIDE: tl.constexpr):
    """Smallest value of format FMT (0 fp32, 1 fp16, 2 bf16, 3 fp8 E4M3; WIDE: with fp32's
    exponents, see _in_quanta) >= v (v >= 0), as fp32."""
    if FMT == 0:
        out = v
    else:
        over, q = _in_quanta(v, FMT, WIDE)
        out = tl.math.ceil(over) * q
    return out


@triton.jit
def round_down(v, FMT: tl.constexpr, WIDE: tl.constexpr):
    """Largest value of format FMT (WIDE: as in round_up) <= v, as fp32."""
    if FMT == 0:
        out = v
    else:
        over, q = _in_quanta(tl.abs(v), FMT, WIDE)
        down = tl.math.floor(over) * q
        up = tl.math.ceil(over) * q
        out = tl.where(v == 0, v, tl.where(v >= 0, down, -up))  # a zero keeps its sign, as in torch
    return out


@triton.jit
def nearest_int(v):
    """v (|v| < 2^22) to the nearest integer, ties to even (torch.round), as int32: adding
    1.5 * 2^23 rounds v in fp32's own round-to-nearest-even and leaves the integer in the low
    mantissa bits of the sum (one addition and one integer subtraction)."""
    return (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def divisor_parts(d):
    """What ``quotient`` needs of a divisor d (> 0, finite, subnormal included): a power of two p
    (2^-126 .. 2^127) that brings d to a normal f = d * p (exact), and inv = 1 / f, correctly
    rounded."""
    e = ((d.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # -127 for a subnormal d
    p = ((tl.minimum(tl.maximum(-e, -126), 127) + 127) << 23).to(tl.float32, bitcast=True)
    f = d * p
    return p, f, tl.math.div_rn(1.0, f)


@triton.jit
def quotient(n, p, f, inv):
    """n / d as IEEE division rounds it (``div_rn``) from d's ``divisor_parts``, wherever
    2^-80 < |n / d| < 2^20: the quotient of n * p by f (both scaled by p exactly) is estimated by
    one product with inv and corrected once by its remainder (two fused multiply-adds: Markstein's
    correctly rounded division), three instructions instead of a division's ten. f >= 2^-22 (a
    subnormal d's), so in that range the remainder is a normal number, hence exact. The remainder
    is taken as q * (-f) + a: Triton negates a value as 0 - x, an instruction a value that ptxas
    cannot fold into the multiply-add (0 - x and -x differ at zero), where -f is one a divisor (the
    same remainder: -q and q * -f differ only as +0 / -0 at q = 0, which takes a = +-0 and q of a's
    sign, and the sum is then a's either way)."""
    a = n * p
    q = a * inv
    return tl.fma(tl.fma(q, -f, a), inv, q)


@triton.jit
def round_to_bf16(v):
    """fp32 -> nearest bf16 value (ties to even), still as fp32. Done on the bits, so the result
    does not depend on how a backend (or Triton's interpreter) converts fp32 to bf16."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return b.to(tl.float32, bitcast=True)


@triton.jit
def to_output(x, OUT_T: tl.constexpr, LIMIT: tl.constexpr, EMULATE: tl.constexpr, PAIRS: tl.constexpr):
    """fp32 x in the output's dtype OUT_T, of finite range +-LIMIT (0: fp32, unbounded): saturated
    to that range and rounded once to nearest even, as ``qkv.dtypes.saturate``. On the GPU a bf16
    or fp16 output whose tile holds two or more values a thread (PAIRS, see :func:`pairs_a_thread`)
    is converted by one ``cvt.rn.satfinite`` a pair of values, which rounds and saturates at once:
    a value that rounds past the largest finite one becomes it, so the result is the clamped
    value's rounding, without the clamp's two instructions a value. Otherwise x is clamped in fp32
    and converted as tl.store would (cvt.rn); under EMULATE (Triton's interpreter, whose fp32 ->
    bf16 conversion may not round to nearest even) a bf16 output is rounded on the bits first
    (:func:`round_to_bf16`)."""
    if LIMIT > 0 and PAIRS and not EMULATE and OUT_T == tl.bfloat16:
        return tl.inline_asm_elementwise("cvt.rn.satfinite.bf16x2.f32 $0, $2, $1;", "=r,f,f", [x],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    if LIMIT > 0 and PAIRS and not EMULATE and OUT_T == tl.float16:
        return tl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,f,f", [x],
                                         dtype=tl.float16, is_pure=True, pack=2)
    if LIMIT > 0:
        x = tl.minimum(tl.maximum(x, -LIMIT), LIMIT)
    if OUT_T == tl.bfloat16 and EMULATE:
        x = round_to_bf16(x)
    return x.to(OUT_T)


def pairs_a_thread(values: int, warps: int) -> bool:
    """Whether a tile of ``values`` (a power of two) spread over ``warps`` warps holds at least two
    a thread, as :func:`to_output`'s conversion of pairs needs (Triton aborts on fewer)."""
    return values >= 2 * 32 * warps


@triton.jit
def split_bf16(x, EXACT: tl.constexpr):
    """fp32 tile -> (high, low) bf16-valued parts with high + low == x to ~16 bits (low = 0 when
    EXACT: x holds bf16 values already)."""
    if EXACT:
        hi = x
        lo = x * 0.0
    else:
        hi = round_to_bf16(x)
        lo = round_to_bf16(x - hi)
    return hi, lo


@triton.jit
def hadamard_signs(i, D: tl.constexpr):
    """Rows ``i`` (indices below D) of the +-1 Sylvester matrix of size D, [len(i), D] in fp32,
    H[i, j] = (-1)^popcount(i & j): the parity of i & j folded by shifts, as many as D's bits
    need (up to 16: a Triton tile is far smaller)."""
    parity = i[:, None] & tl.arange(0, D)[None, :]
    if D > 256:
        parity ^= parity >> 8
    parity ^= parity >> 4
    parity ^= parity >> 2
    parity ^= parity >> 1
    return tl.where((parity & 1) == 1, -1.0, 1.0)


@triton.constexpr_function
def kron_sides(d: int) -> tuple[int, int]:
    """(A, B) with A * B = d, both powers of two and A >= B, as near as can be to sqrt(d)."""
    b = 1 << (d.bit_length() - 1) // 2
    return d // b, b


@triton.constexpr_function
def _sqrt(d: int) -> float:
    return math.sqrt(d)


@triton.jit
def hadamard_sums(x, D: tl.constexpr):
    """x H for rows x [M, D] fp32 (H the +-1 Sylvester matrix, symmetric; D a power of two) as
    fp32 sums of +-x, through H_D = H_A (x) H_B (i & j splits into high and low index bits): each
    row as an [A, B] matrix X, H_A X H_B: A * B * (A + B) products a row (3,072 for D = 128)
    instead of D^2."""
    A: tl.constexpr = kron_sides(D)[0]
    B: tl.constexpr = kron_sides(D)[1]
    M: tl.constexpr = x.shape[0]
    x = tl.reshape(x, (M, A, B))
    y = tl.sum(x[:, :, None, :] * hadamard_signs(tl.arange(0, B), B)[None, None, :, :], 3)  # X H_B
    z = tl.sum(hadamard_signs(tl.arange(0, A), A)[None, :, :, None] * y[:, None, :, :], 2)  # H_A X H_B
    return tl.reshape(z, (M, D))


@triton.jit
def hadamard_dot(x, D: tl.constexpr, EMULATE: tl.constexpr):
    """x H for a tile of rows x [M, D] fp32 (M >= 16) on bf16 tensor cores: the +-1 matrix built in
    registers, x split into high and low bf16 parts (H is exact in bf16; ~2^-16 relative)."""
    h = hadamard_signs(tl.arange(0, D), D)
    hi, lo = split_bf16(x, False)
    return bf16_dot(hi, h, EMULATE) + bf16_dot(lo, h, EMULATE)


@triton.jit
def hadamard_rows(x, rows, D: tl.constexpr, EMULATE: tl.constexpr):
    """x [M, D] (M >= 16) in fp32 with its rows ``rows`` ([M] bool; None: every row) rotated, x H /
    sqrt(D) (:func:`hadamard_dot`, divided correctly rounded as the Hadamard kernel does). H /
    sqrt(D) is orthonormal and symmetric: the same rotation takes a row of a Hadamard-rotated
    tensor back out of its stored basis and a row stored unrotated into it."""
    x = x.to(tl.float32)
    y = tl.math.div_rn(hadamard_dot(x, D, EMULATE), _sqrt(D))
    if rows is not None:
        y = tl.where(rows[:, None], y, x)
    return y


@triton.jit
def bf16_dot(a, b, EMULATE: tl.constexpr):
    """a @ b for bf16-valued fp32 tiles: a bf16 tensor-core product with fp32 accumulation, or
    (EMULATE: Triton's interpreter has no bf16 dot) the same exact products summed in fp64 and
    rounded once to fp32. The interpreter's fp32 dot is the host BLAS's, whose summation order
    can depend on the tile's shape (OpenBLAS on AMD EPYC): two tilings of the same products would
    round differently; sums of bf16 products in fp64 are exact (or off far below fp32's rounding)."""
    if EMULATE:
        out = tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee").to(tl.float32)
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return out
