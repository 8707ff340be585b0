"""Input checks shared by every entry point: typed errors that name the problem."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from qkv.dtypes import INPUT_DTYPES
from qkv.errors import ConfigError, DeviceError, DTypeError, NonFiniteError, QKVError, ShapeError, ValueRangeError
from qkv.readback import Arriving

# Largest magnitude accepted: leaves room for sums, rotations and centroid differences in fp32.
MAX_MAGNITUDE = 2.0**120


def check_kv_layout(name: str, x: object) -> torch.Tensor:
    """Type, rank, dtype and non-empty checks (no data access)."""
    if not isinstance(x, torch.Tensor):
        raise DTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise DTypeError(f"{name} is a {x.layout} tensor; qkv takes dense (strided) tensors: call .to_dense()")
    if x.is_meta:
        raise DeviceError(f"{name} is on the meta device: it holds no values to compress")
    if x.dim() != 4:
        raise ShapeError(f"{name} must have rank 4 [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise DTypeError(f"{name} has dtype {x.dtype}; supported: float32, float16, bfloat16")
    if 0 in x.shape:
        axis = ("batch", "heads", "tokens (S)", "head_dim")[list(x.shape).index(0)]
        raise ShapeError(f"{name} is empty along {axis}: shape {tuple(x.shape)}")
    return x


def _peaks(named: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """max |x| of each tensor of ``named``, fp32, on their device (NaN and Inf propagate): one
    reduction per tensor that reads it in its dtype and writes fp32 (no separate cast)."""
    return torch.stack([torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32) for _, t in named])


def _verdict(label: str, peak: float, t: torch.Tensor | None) -> QKVError | None:
    """The error for ``label``'s tensor of max |x| ``peak`` (None: fine); ``t``, the tensor if it
    is still at hand, adds where its first bad value is."""
    if not (peak < float("inf")):  # NaN compares false
        if t is None:
            return NonFiniteError(f"{label} holds NaN/Inf values")
        finite = torch.isfinite(t)
        first = tuple(torch.nonzero(~finite)[0].tolist())
        return NonFiniteError(f"{label} holds {int((~finite).sum())} NaN/Inf values (first at index {first})")
    if peak > MAX_MAGNITUDE:
        return ValueRangeError(f"{label} has magnitude {peak:.3g} > 2**120, beyond what qkv can process without overflow")
    return None


def _first_error(named: list[tuple[str, torch.Tensor]]) -> QKVError | None:
    """The first failure among ``named`` with where it is, or None (one read-back)."""
    peaks = _peaks(named)
    return next((e for (label, t), peak in zip(named, peaks.tolist()) if (e := _verdict(label, peak, t)) is not None),
                None)


def row_peaks(x: torch.Tensor) -> torch.Tensor:
    """max |x| of every (batch, head) row of ``x`` [B, H, S, D]: [B, H] fp32, NaN and Inf
    propagating; one read of ``x`` in its dtype."""
    return torch.linalg.vector_norm(x.flatten(2), ord=float("inf"), dim=-1, dtype=torch.float32)


def check_kv_values(name: str, x: torch.Tensor, *more: tuple[str, torch.Tensor]) -> None:
    """Finite, and |x| <= 2**120; ``more``: further (name, tensor) pairs checked with the same
    single read-back to the host (one reduction per tensor; details computed only on failure)."""
    error = _first_error([(name, x), *more])
    if error is not None:
        raise error


def deferred(t: torch.Tensor) -> bool:
    """Whether the values of ``t`` are checked without waiting (:func:`check_kv_values_later`): on
    a CUDA device, where a read-back waits for the queue to drain."""
    return t.is_cuda


class PendingCheck:
    """:func:`check_kv_values` of tensors on a GPU with its verdict still on the way: the peaks
    are reduced on the device and sent to the host without waiting (:class:`~qkv.readback.Arriving`;
    off a GPU, where tests force the deferral, they are at hand); :meth:`ready` says whether they
    have arrived, :meth:`error` reads them (waiting if they have not)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], peaks: torch.Tensor | None = None) -> None:
        self.labels = [label for label, _ in named]
        self._peaks = Arriving(_peaks(named) if peaks is None else peaks)  # [len(named)] fp32
        self._errors: list[QKVError | None] | None = None

    def ready(self) -> bool:
        """Whether the verdict has arrived (never waits; while a CUDA graph is being captured,
        where an event may not be queried, it has not)."""
        return self._errors is not None or self._peaks.ready()

    def error(self, indices: Sequence[int] | None = None) -> QKVError | None:
        """The first failure among the tensors at ``indices`` (all: None), or None; waits for the
        verdict if it has not arrived."""
        if self._errors is None:
            self._errors = [_verdict(label, peak, None) for label, peak in zip(self.labels, self._peaks.values())]
        chosen = self._errors if indices is None else [self._errors[i] for i in indices]
        return next((e for e in chosen if e is not None), None)


def _refuse_capture(name: str, x: torch.Tensor) -> None:
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ConfigError(f"{name}: a value check cannot be captured in a CUDA graph (a replay would not check "
                          "the values it is given); capture with validate=False")


def check_kv_values_later(name: str, x: torch.Tensor, *more: tuple[str, torch.Tensor]) -> PendingCheck | None:
    """:func:`check_kv_values` without waiting for a GPU: a :class:`PendingCheck` when ``x`` is
    :func:`deferred`, otherwise checked now (raising) and None. Refused while a CUDA graph is being
    captured: a replay would not check the values it is given."""
    _refuse_capture(name, x)
    if deferred(x):
        return PendingCheck([(name, x), *more])
    check_kv_values(name, x, *more)
    return None


def check_kv_pair(k: object, v: object) -> None:
    """Validate K and V together, without reading their values: each valid, same shape, same
    device (their values: :func:`check_kv_values` or :func:`values_checked`)."""
    check_kv_layout("k", k)
    check_kv_layout("v", v)
    if k.shape != v.shape:
        raise ShapeError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.device != v.device:
        raise DeviceError(f"k is on {k.device} but v is on {v.device}")


class ValueCheck:
    """What :func:`values_checked` yields: the check of the tensors ``named`` ([B, H, S, D] each)
    around the work that reads them. Each tensor's (batch, head) row peaks (max |x|, fp32, NaN and
    Inf propagating) are reduced before the work (:meth:`rows`), or, for a tensor marked
    ``measured`` (the work reads every value of it anyway: k-means's first assignment pass), taken
    from the work (:meth:`report`); either way they are sent to the host as soon as they are
    known (:class:`PendingCheck`), and :meth:`error` reads the verdict."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], measured: Sequence[bool]) -> None:
        self.named = named
        self._rows: list[torch.Tensor | None] = [None if m else row_peaks(t) for (_, t), m in zip(named, measured)]
        self._sent: list[tuple[list[int], PendingCheck]] = []
        self._send([i for i, r in enumerate(self._rows) if r is not None])

    def _send(self, indices: list[int]) -> None:
        if indices:
            peaks = torch.stack([self._rows[i].amax() for i in indices])  # NaN propagates
            self._sent.append((indices, PendingCheck([self.named[i] for i in indices], peaks)))

    def rows(self, i: int) -> torch.Tensor | None:
        """Tensor i's row peaks ([B, H]), or None where the work is to measure them."""
        return self._rows[i]

    def report(self, indices: Sequence[int], rows: Sequence[torch.Tensor]) -> None:
        """The row peaks of the tensors at ``indices``, measured by the work (any shape with their
        B x H rows)."""
        for i, r in zip(indices, rows):
            self._rows[i] = r
        self._send(list(indices))

    def _reduce_missing(self) -> None:
        """The row peaks of the tensors the work did not report, reduced now."""
        missing = [i for i, r in enumerate(self._rows) if r is None]
        for i in missing:
            self._rows[i] = row_peaks(self.named[i][1])
        self._send(missing)

    def error(self) -> QKVError | None:
        """The first failure among the tensors in ``named``'s order, or None (waits for the
        verdicts that have not arrived)."""
        self._reduce_missing()
        errors: list[QKVError | None] = [None] * len(self.named)
        for indices, pending in self._sent:
            for j, i in enumerate(indices):
                errors[i] = pending.error([j])
        return next((e for e in errors if e is not None), None)


@contextlib.contextmanager
def values_checked(named: Sequence[tuple[str, torch.Tensor]],
                   measured: Sequence[bool] | None = None) -> Iterator[ValueCheck | None]:
    """:func:`check_kv_values` of the (name, [B, H, S, D] tensor) pairs ``named`` (none: nothing is
    checked, and None is yielded) around the work of the ``with`` block, which reads them and is
    given a :class:`ValueCheck` with their :func:`row_peaks` (one read of each tensor serves the
    check and, for example, k-means's row scale). Where a read-back would wait (:func:`deferred`:
    a GPU) the verdict is read only once the work is queued too, so the host never waits in the
    middle of it and the GPU never idles while the host launches it; the work then runs on bad
    values too, harmlessly, and the check's error (with where the first bad value is) replaces its
    result; the tensors marked in ``measured`` are not reduced at all: the work reports their row
    peaks (:meth:`ValueCheck.report`) from a pass that reads them anyway. Elsewhere the values are
    checked before the work starts."""
    named = list(named)
    if not named:
        yield None
        return
    _refuse_capture(*named[0])
    later = deferred(named[0][1])
    check = ValueCheck(named, measured if later and measured is not None else [False] * len(named))
    if not later and check.error() is not None:
        raise _first_error(named) or check.error()
    try:
        yield check
    except Exception as exc:  # work that failed on bad values: the values are to blame
        if later and check.error() is not None:
            raise _first_error(named) or check.error() from exc
        raise
    if later and check.error() is not None:
        raise _first_error(named) or check.error()  # details: the tensors are at hand
