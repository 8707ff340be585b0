"""Guaranteed reconstruction-error bounds, computed from compressed data alone.

A :class:`Bound` states how far a reconstruction ``x_hat`` may be from the original ``x`` that
nobody kept:

- ``element``: ``value`` has the shape of ``x`` [..., S, D] and ``|x_hat - x| <= value`` holds for
  every element (affine quantization, casts, centroid smoothing, residual stages, windows);
- ``token_l2``: ``value`` is [..., S] and ``||x_hat - x||_2`` over D ``<= value`` for every token
  (after a rotation, which mixes the D errors of a token and makes per-element bounds loose);
- ``none``: some component declares no error propagation; ``reason`` names it. Nothing is checked
  against it and asking it for numbers raises :class:`~qkv.errors.NoBoundError`.

A value of ``inf`` means "no guarantee for this element/token" (a value beyond what a storage
format holds, e.g. an fp16 output past 65504); a bound is never NaN.

How the pieces compose (each lossy component states its own rule, see ``error_bound`` /
``propagate`` on the quantizers, smoothers and stagings): the quantizer bounds the error of the
last residual it stored; decoding then undoes every smoothing stage in reverse, each stage passing
the bound on with its own float rounding added (or, for a rotation, turning it into a per-token L2
bound); finally the fp32 result is rounded to the output dtype. Rounding is stated with the unit
roundoff ``u(fmt) = 2**-p`` of a float format with p significand bits (fp32 ``2**-24``, fp16
``2**-11``, bf16 ``2**-8``): round-to-nearest gives ``|fl(y) - y| <= u * |fl(y)| + tiny / 2`` with
``tiny`` the format's smallest subnormal. Bounds are computed in fp64 and widened by ``1 + 2**-40``
at the end so that their own arithmetic cannot make them too small.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import torch

from qkv.compressed import CompressedKV, CompressedTensor
from qkv.errors import BoundViolation, NoBoundError, ShapeError
from qkv.format import AffineFormat, Undo
from qkv.kernels.kmeans import gather_centroids

U32 = 2.0**-24  # unit roundoff of fp32, the arithmetic of every reference kernel
FLUSH = 2.0**-126  # smallest normal fp32: the most one fp32 operation loses to underflow, gradual
# or flushed to zero (GPU kernels may flush subnormals)
SAFETY = 1 + 2.0**-40  # covers the fp64 arithmetic of the bound itself and of the observed errors

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_SUBNORMAL = {torch.float32: 2.0**-149, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}
# formats whose every value each format holds exactly
_HOLDS = {
    torch.float32: {torch.float32, torch.float16, torch.bfloat16},
    torch.float16: {torch.float16},
    torch.bfloat16: {torch.bfloat16},
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``2**-p`` for a float format with p significand bits (fp32, fp16, bf16)."""
    return _UNIT_ROUNDOFF[dtype]


def holds(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """True when every value of ``narrow`` is exactly a value of ``wide`` (a cast is exact)."""
    return narrow in _HOLDS.get(wide, {wide})


def rounding_error(rounded: torch.Tensor, source: torch.dtype) -> torch.Tensor:
    """fp64 bound on ``|rounded - y|`` for any ``y`` of dtype ``source`` that round-to-nearest cast
    to ``rounded`` (its dtype): 0 when the cast is exact, else ``u * |rounded| + tiny / 2``
    (inf where ``rounded`` overflowed)."""
    target = rounded.dtype
    if holds(target, source):
        return torch.zeros(rounded.shape, dtype=torch.float64, device=rounded.device)
    return rounded.double().abs() * unit_roundoff(target) + _SUBNORMAL[target] / 2


class BoundKind(str, enum.Enum):
    ELEMENT = "element"
    TOKEN_L2 = "token_l2"
    NONE = "none"


def _sanitize(value: torch.Tensor) -> torch.Tensor:
    value = value.double()
    return torch.where(torch.isnan(value), torch.full_like(value, math.inf), value)


@dataclasses.dataclass(frozen=True, eq=False)
class Bound:
    """A guaranteed bound on reconstruction error (see the module docstring).

    kind: ``element`` (value [..., S, D]), ``token_l2`` (value [..., S]) or ``none`` (value None,
    ``reason`` says which component declares nothing). Values are fp64, >= 0, possibly inf.
    """

    kind: BoundKind
    value: torch.Tensor | None = None
    reason: str = ""

    @classmethod
    def element(cls, value: torch.Tensor) -> "Bound":
        return cls(BoundKind.ELEMENT, _sanitize(value))

    @classmethod
    def token_l2(cls, value: torch.Tensor) -> "Bound":
        return cls(BoundKind.TOKEN_L2, _sanitize(value))

    @classmethod
    def none(cls, reason: str) -> "Bound":
        return cls(BoundKind.NONE, None, reason)

    @property
    def is_none(self) -> bool:
        return self.kind is BoundKind.NONE

    def __repr__(self) -> str:
        if self.value is None:
            return f"Bound(none: {self.reason})"
        top = float(self.value.max()) if self.value.numel() else 0.0
        return f"Bound({self.kind.value}, shape={list(self.value.shape)}, max={top:.6g})"

    def _require(self) -> torch.Tensor:
        if self.value is None:
            raise NoBoundError(f"no error bound: {self.reason}")
        return self.value

    def max(self) -> float:
        """The largest bound (0 for an empty tensor); raises NoBoundError for ``none``."""
        value = self._require()
        return float(value.max()) if value.numel() else 0.0

    @property
    def unbounded(self) -> torch.Tensor:
        """Boolean mask of elements (or tokens) with no guarantee (bound = inf)."""
        return torch.isinf(self._require())

    # -- conversions and sums ----------------------------------------------------------------
    def as_token_l2(self) -> "Bound":
        """The per-token L2 bound this bound implies: ``sqrt(sum_D b_i**2)`` for an element bound."""
        if self.kind is BoundKind.ELEMENT:
            return Bound.token_l2(self.value.square().sum(-1).sqrt())
        return self

    def elementwise(self, head_dim: int) -> torch.Tensor:
        """A per-element bound [..., S, D] this bound implies (a token's L2 bound bounds each of its
        elements)."""
        value = self._require()
        if self.kind is BoundKind.ELEMENT:
            return value
        return value.unsqueeze(-1).expand(*value.shape, head_dim)

    def plus(self, term: torch.Tensor) -> "Bound":
        """This bound plus a per-element error ``term`` [..., S, D] (triangle inequality; in L2 for
        a token bound)."""
        if self.is_none:
            return self
        if self.kind is BoundKind.ELEMENT:
            return Bound.element(self.value + term)
        return Bound.token_l2(self.value + term.double().square().sum(-1).sqrt())

    def widened(self) -> "Bound":
        """Multiplied by ``SAFETY`` (done once, on the final bound)."""
        return self if self.is_none else Bound(self.kind, self.value * SAFETY)

    def map(self, fn) -> "Bound":
        """The same bound with ``fn`` applied to its value (reshapes, device moves)."""
        return self if self.is_none else Bound(self.kind, fn(self.value), self.reason)

    @staticmethod
    def cat(parts: list["Bound"]) -> "Bound":
        """Concatenate bounds of consecutive token ranges (along S). Any ``none`` part makes the
        result ``none``; element and token parts give a token bound."""
        for part in parts:
            if part.is_none:
                return part
        if all(p.kind is BoundKind.ELEMENT for p in parts):
            return Bound.element(torch.cat([p.value for p in parts], dim=-2))
        return Bound.token_l2(torch.cat([p.as_token_l2().value for p in parts], dim=-1))

    # -- checking ------------------------------------------------------------------------------
    def errors(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """The observed error, measured as this bound states it (fp64): ``|x_hat - x|`` per element
        or ``||x_hat - x||_2`` per token."""
        self._require()
        if x.shape != x_hat.shape:
            raise ShapeError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
        diff = (x_hat.double() - x.double()).to(self.value.device)
        if self.kind is BoundKind.ELEMENT:
            return diff.abs()
        return diff.square().sum(-1).sqrt()

    def violations(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Boolean mask (the bound's shape) of elements or tokens whose error exceeds the bound; a NaN
        error is a violation unless the bound there is inf (no guarantee)."""
        err = self.errors(x, x_hat)
        if err.shape != self.value.shape:
            raise ShapeError(f"bound {tuple(self.value.shape)} does not match the error {tuple(err.shape)}")
        return ~(err <= self.value) & ~torch.isinf(self.value)

    def check(self, x: torch.Tensor, x_hat: torch.Tensor, name: str = "x") -> None:
        """Raise :class:`~qkv.errors.BoundViolation` if ``x_hat`` is farther from ``x`` than the
        bound allows anywhere (NoBoundError for a ``none`` bound)."""
        bad = self.violations(x, x_hat)
        if bool(bad.any()):
            raise BoundViolation(describe_violation(self, x, x_hat, bad, name))


def worst_index(bound: Bound, x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    """Index (into the bound) of the largest error / bound ratio among ``mask``; NaN errors first."""
    ratio = bound.errors(x, x_hat) / bound.value.clamp_min(torch.finfo(torch.float64).tiny)
    ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, math.inf), ratio)
    ratio = torch.where(mask, ratio, torch.full_like(ratio, -1.0))
    return tuple(int(i) for i in torch.unravel_index(ratio.flatten().argmax(), ratio.shape))


def describe_violation(bound: Bound, x: torch.Tensor, x_hat: torch.Tensor, bad: torch.Tensor, name: str) -> str:
    """One paragraph: how many elements/tokens violate, and the worst one with its values."""
    err = bound.errors(x, x_hat)
    worst = worst_index(bound, x, x_hat, bad)
    unit = "elements" if bound.kind is BoundKind.ELEMENT else "tokens (L2 over D)"
    error, value = float(err[worst]), float(bound.value[worst])
    text = (
        f"{name}: {int(bad.sum())} of {bad.numel()} {unit} exceed the {bound.kind.value} bound; "
        f"worst at {list(worst)}: error {error:.6g} > bound {value:.6g} ({error / max(value, 1e-300):.4g}x)"
    )
    if bound.kind is BoundKind.ELEMENT:
        text += f", x = {float(x[worst]):.9g}, x_hat = {float(x_hat[worst]):.9g}"
    return text


@dataclasses.dataclass(frozen=True, eq=False)
class ErrorState:
    """What decoding knows at one point of the pipeline, used while composing a bound.

    bound: the error bound of the value decoded so far ([N, S, D] element, [N, S] token_l2, or
        none). magnitude: fp64 [N, S, D], an upper bound on ``|v|`` of every fp32 value the decoder
        computes for an element from here on until the next rotation (during an additive add-back:
        of every partial sum, in any order of the stages) - what the float rounding of the
        remaining steps is relative to.
    """

    bound: Bound
    magnitude: torch.Tensor

    def with_none(self, reason: str) -> "ErrorState":
        return ErrorState(Bound.none(reason), self.magnitude)


def widen_for_add_back(state: ErrorState, added: list[torch.Tensor]) -> ErrorState:
    """The magnitude envelope of an add-back of the per-token offsets ``added`` (each [N, S, D]):
    every partial sum, in any order, is at most ``|y| + sum |c_t|``, grown by one fp32 rounding per
    addition, ``(1 + u)**(T + 1)``."""
    total = state.magnitude
    for offsets in added:
        total = total + offsets.double().abs()
    return ErrorState(state.bound, total * (1 + U32) ** (len(added) + 1))


def additive_propagate(state: ErrorState) -> ErrorState:
    """Bound after undoing one additive stage, for a smoother whose forward computes the residual
    ``r = fl32(x - c)`` with ``c`` exactly the values the decoder adds back (centroids subtracted as
    stored), and whose decoder adds ``c`` in fp32.

    With M = ``state.magnitude`` (it bounds ``|x - c|``, ``|r|`` up to the error, and the decoder's
    partial sums) and b the incoming bound::

        b' = b + u32 * (M + b)   (the encoder's subtraction rounded r)
               + u32 * M         (the decoder's addition rounded the partial sum)

    so the bound of the final residual passes through, plus two fp32 roundings per stage (and
    ``2 * FLUSH`` for a kernel that flushes subnormal sums to zero).
    """
    if state.bound.is_none:
        return state
    b = state.bound.elementwise(state.magnitude.shape[-1])
    return ErrorState(state.bound.plus(U32 * (2 * state.magnitude + b) + 2 * FLUSH), state.magnitude)


def rotation_kappa(head_dim: int) -> float:
    """Relative L2 error bound of one normalized Hadamard transform computed in fp32, for any
    summation order: dense ``+-1`` dot products whose inputs are exact to 16 significant bits (bf16
    tensor cores on a high/low split drop at most ``2**-17`` of each input; the butterflies drop
    nothing), about ``2D + 4`` fp32 roundings per output (counted twice, for accumulators that
    truncate) and the rounded division by ``sqrt(D)``::

        kappa = 2**-16 + 5 sqrt(D) (D + 2) u32

    The butterfly reference needs only ``(log2(D) + 2) * u32``; a kernel below 16 significant bits
    would break this bound (the property tests on a GPU catch it).
    """
    return 2.0**-16 + 5 * math.sqrt(head_dim) * (head_dim + 2) * U32


def rotation_propagate(state: ErrorState) -> ErrorState:
    """Bound after undoing an orthonormal rotation along D (Hadamard), per token in L2.

    Decoding computes ``x_hat = H~(y)``, encoding computed ``r = H~(x)``; ``H~`` is the rotation in
    fp32, ``||H~(v) - H v|| <= kappa * ||v|| + a`` (:func:`rotation_kappa`; ``a = D**1.5 * FLUSH``
    covers fp32 underflow, flushed to zero on tensor cores). With ``beta`` the incoming bound on
    ``||y - r||_2`` and ``Y = ||M||_2`` bounding ``||y||_2``, since ``x = H (r - e)`` with
    ``||e|| <= kappa * ||x|| + a``::

        ||x_hat - x||_2 <= beta + kappa * Y + kappa * (Y + beta + a) / (1 - kappa) + 2 * a

    The new magnitude bounds every element by its token's norm: ``|x_hat_i| <= (1 + kappa) * Y + a``.
    """
    d = state.magnitude.shape[-1]
    kappa = rotation_kappa(d)
    a = d**1.5 * FLUSH
    y = state.magnitude.square().sum(-1).sqrt()
    magnitude = ((1 + kappa) * y + a).unsqueeze(-1).expand_as(state.magnitude)
    if state.bound.is_none:
        return ErrorState(state.bound, magnitude)
    beta = state.bound.as_token_l2().value
    value = beta + kappa * y + kappa * (y + beta + a) / (1 - kappa) + 2 * a
    return ErrorState(Bound.token_l2(value), magnitude)


def output_cast(state: ErrorState, source: torch.dtype, x_hat: torch.Tensor | None, target: torch.dtype) -> Bound:
    """The bound after rounding the decoded ``source``-dtype values to the output dtype ``target``.

    ``x_hat``: the rounded output itself (tighter: ``u(target) * |x_hat| + tiny / 2``); without it,
    ``|x_hat| <= (1 + u) * magnitude`` is used. Exact casts add nothing.
    """
    if state.bound.is_none or holds(target, source):
        return state.bound
    if x_hat is not None:
        term = rounding_error(x_hat.to(state.magnitude.device), source)
    else:
        u = unit_roundoff(target)
        term = state.magnitude * (u * (1 + u)) + _SUBNORMAL[target] / 2
    return state.bound.plus(term)


@dataclasses.dataclass(frozen=True, eq=False)
class KVBound:
    """The bounds of one compressed span's keys (``k``) and values (``v``), each [B, H, S, D]
    (element) or [B, H, S] (token_l2) or none."""

    k: Bound
    v: Bound

    def check(self, k: torch.Tensor, v: torch.Tensor, k_hat: torch.Tensor, v_hat: torch.Tensor) -> None:
        """Raise BoundViolation if either reconstruction exceeds its bound."""
        self.k.check(k, k_hat, "k")
        self.v.check(v, v_hat, "v")


def affine_error(fmt: AffineFormat, scales: torch.Tensor, zeros: torch.Tensor | None, mult: torch.Tensor | None) -> ErrorState:
    """Guaranteed error of dequantized affine codes, from the stored block parameters alone.

    scales / zeros: [N, R, G] as stored (rows as quantized: R = tokens for ``axis="token"``,
    R = D for ``axis="channel"``); mult: [N] fp32 powers of two, or None. With ``s`` and ``z``
    the fp32 scale and zero point the decoder uses (stored value times ``mult``), ``L = levels
    - 1`` and ``u = 2**-24``, every element of a block satisfies::

        |x_hat - x| <= s / 2 + 16 u ((L + 1) s + |z|) + (L + 4) 2**-126 max(1, mult)

    ``s / 2``: round to nearest on the stored grid. The scale's own rounding is already in
    ``s``: it is stored rounded up and the zero point rounded down, so the grid covers the
    block. ``16 u (...)``: the fp32 arithmetic of ``(x - z) / s + offset``, the clamp, and
    ``(code - offset) * s + z`` (fewer than 16 roundings of values at most ``(L + 1) s + |z|``).
    The last term covers fp32 underflow of tiny scales (gradual, or flushed to zero by a GPU
    kernel; ``2**-126`` is the smallest normal fp32). Returns the bound and the magnitude
    ``(L s + |z|)(1 + 4u)`` of the decoded values, per element in token layout [N, S_q, D].
    """
    m = mult.view(-1, 1, 1) if mult is not None else torch.ones((), device=scales.device)
    s = (scales.float() * m).double()  # exactly the decoder's fp32 scale
    z = (zeros.float() * m).double().abs() if zeros is not None else torch.zeros((), dtype=torch.float64)
    z = z.to(s.device)
    top = fmt.levels - 1
    tiny = (top + 4) * FLUSH * m.double().clamp_min(1)
    bound = s / 2 + 16 * U32 * ((top + 1) * s + z) + tiny
    magnitude = (top * s + z) * (1 + 4 * U32)
    bound, magnitude = (t.repeat_interleave(fmt.block, dim=-1) for t in (bound, magnitude))
    if fmt.axis == "channel":
        bound, magnitude = bound.transpose(1, 2), magnitude.transpose(1, 2)
    return ErrorState(Bound.element(bound), magnitude)


def cast_error(stored: torch.Tensor, input_dtype: torch.dtype) -> ErrorState:
    """Guaranteed error of values stored cast [..., S, D] against the input of ``input_dtype``
    they were rounded from: 0 when the format holds every input value, else half an ulp,
    ``u(format) * |stored| + tiny / 2`` per element (inf where it overflowed)."""
    return ErrorState(Bound.element(rounding_error(stored, input_dtype)), stored.double().abs())


def residual_error(ct: CompressedTensor) -> ErrorState:
    """fp32 bound [B*H, S_q, D] of the quantized tokens of ``ct`` with every stage undone: the
    codes' error, then each stage undone last to first (for add-backs, the magnitude first
    becomes the envelope of every partial sum: decoding may add the stages in any order)."""
    fmt = ct.format
    state = affine_error(fmt.codes, ct.scales.flatten(0, 1), _flat(ct.zeros), _flat(ct.scale_mult))
    if fmt.codes.axis == "token" and state.magnitude.shape[1] != ct.quantized_tokens:
        raise ShapeError(f"scales cover {state.magnitude.shape[1]} tokens, expected {ct.quantized_tokens}")
    if fmt.undo is Undo.ADD:
        added = [gather_centroids(s.centroids.flatten(0, 1), ct.stage_assignments(i)) for i, s in enumerate(ct.stages)]
        state = widen_for_add_back(state, added)
        for _ in added:
            state = additive_propagate(state)
    elif fmt.undo is Undo.ROTATE:
        for _ in ct.stages:
            state = rotation_propagate(state)
    return state


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.flatten(0, 1)


def tensor_bound(ct: CompressedTensor, x_hat: torch.Tensor | None = None) -> Bound:
    """A guaranteed bound on ``|decompress(ct) - x|`` computed from ``ct`` alone: element
    [B, H, S, D] or, after a rotation, token_l2 [B, H, S]. The codes' error is carried through
    every stage, and the rounding to the output dtype is added last, from ``x_hat`` (the
    decompressed output, tighter) when given. Full-precision tokens: 0."""
    b, h, s, d = ct.shape
    s_q = ct.quantized_tokens
    if x_hat is not None and tuple(x_hat.shape) != tuple(ct.shape):
        raise ShapeError(f"x_hat has shape {tuple(x_hat.shape)}, the compressed tensor {tuple(ct.shape)}")
    parts = []
    if s_q:
        if ct.format.cast is not None:
            state = cast_error(ct.codes.flatten(0, 1), ct.dtype)
            source = ct.format.cast_dtype
            if holds(source, ct.dtype):  # stored exactly as input: they cast back exactly
                source = ct.dtype
        else:
            state = residual_error(ct)
            source = torch.float32
        decoded = None if x_hat is None else x_hat[:, :, :s_q].flatten(0, 1)
        bound = output_cast(state, source, decoded, ct.dtype)
        parts.append(bound.map(lambda v: v.unflatten(0, (b, h))))
    if s_q < s:
        device = ct.fp_tokens.device
        parts.append(Bound.element(torch.zeros(b, h, s - s_q, d, dtype=torch.float64, device=device)))
    return Bound.cat(parts).widened()


def kv_bound(ckv: CompressedKV, k_hat: torch.Tensor | None = None, v_hat: torch.Tensor | None = None) -> "KVBound":
    """Guaranteed bounds on the reconstruction error of a span's keys and values, from the data
    alone (:func:`tensor_bound` of each); ``k_hat`` / ``v_hat``: the decompressed outputs, if at
    hand (tighter output-dtype rounding)."""
    return KVBound(tensor_bound(ckv.k, k_hat), tensor_bound(ckv.v, v_hat))


__all__ = [
    "FLUSH",
    "SAFETY",
    "U32",
    "Bound",
    "BoundKind",
    "ErrorState",
    "KVBound",
    "additive_propagate",
    "affine_error",
    "cast_error",
    "describe_violation",
    "holds",
    "kv_bound",
    "output_cast",
    "rotation_kappa",
    "rotation_propagate",
    "rounding_error",
    "tensor_bound",
    "unit_roundoff",
    "widen_for_add_back",
    "worst_index",
]
