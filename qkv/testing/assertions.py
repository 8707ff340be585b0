"""``assert_within_bound``: compress, decompress, and check against the bound the data reports."""

from __future__ import annotations

import os
import tempfile

import torch

from qkv.bounds import Bound, KVBound, describe_violation, worst_index
from qkv.caches.policy import Policy, TensorPolicy
from qkv.caches.presets import build_policy
from qkv.errors import BoundViolation, NoBoundError, QKVError

INLINE_VALUES = 1024  # larger minimal examples are saved to a file instead of printed


def assert_within_bound(
    policy: Policy,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    require_bound: bool = True,
    allow_unbounded: bool = False,
    minimize: bool = True,
) -> KVBound:
    """Compress ``k``, ``v`` [B, H, S, D] (``v`` defaults to ``k``) with ``policy``, decompress, and
    check each reconstruction against the bound its compressed data reports.

    Raises :class:`~qkv.errors.BoundViolation` (an AssertionError) naming the worst element and
    printing a minimal failing example: the input cut to the failing (batch, head) and halved
    along tokens while it still fails, with the code that reproduces it. ``require_bound``: a policy
    that reports no bound (a component declares none) raises NoBoundError. ``allow_unbounded``:
    accept elements whose bound is inf (a value overflowed a storage format, e.g. fp16 past
    65504); by default they fail, since the reconstruction guarantees nothing there.
    Returns the bounds.
    """
    v = k if v is None else v
    ckv = policy.compress(k, v, backend=backend)
    k_hat, v_hat = policy.decompress(ckv, backend=backend)
    bound = policy.error_bound(ckv, k_hat, v_hat)
    for name, tensor, x, x_hat, b in (("k", policy.k, k, k_hat, bound.k), ("v", policy.v, v, v_hat, bound.v)):
        if x_hat.shape != x.shape or x_hat.dtype != x.dtype:
            raise BoundViolation(
                f"{name}: decompress gave {tuple(x_hat.shape)} {x_hat.dtype}, input was {tuple(x.shape)} {x.dtype}"
            )
        if b.is_none:
            if require_bound:
                raise NoBoundError(f"policy {policy}: {name} has no error bound: {b.reason}")
            continue
        bad = _failures(b, x, x_hat, allow_unbounded)
        if bool(bad.any()):
            report = _report(policy, tensor, name, x, x_hat, b, bad, backend, allow_unbounded, minimize)
            raise BoundViolation(report)
    return bound


def _failures(bound: Bound, x: torch.Tensor, x_hat: torch.Tensor, allow_unbounded: bool) -> torch.Tensor:
    bad = bound.violations(x, x_hat)
    return bad if allow_unbounded else bad | bound.unbounded


def _fails(tensor: TensorPolicy, x: torch.Tensor, backend: str, allow_unbounded: bool) -> bool:
    try:
        ct = tensor.compress(x, backend=backend)
        x_hat = tensor.decompress(ct, backend=backend)
        bound = tensor.error_bound(ct, x_hat)
    except QKVError:
        return False
    return not bound.is_none and bool(_failures(bound, x, x_hat, allow_unbounded).any())


def _minimize(tensor: TensorPolicy, x: torch.Tensor, worst: tuple[int, ...], backend: str, allow_unbounded: bool):
    # worst: (b, h, s[, d]) of the failure
    """The failing (batch, head) alone, then halved along tokens (keeping the failing token) while
    it still fails. Returns (tensor, what was done)."""
    b, h, s = worst[:3]
    small = x[b : b + 1, h : h + 1]
    if not _fails(tensor, small, backend, allow_unbounded):
        return x, "the failure needs the whole input"
    while small.shape[2] > 1:
        half = small.shape[2] // 2
        lo, hi = (0, half) if s < half else (half, small.shape[2])
        trial = small[:, :, lo:hi]
        if not _fails(tensor, trial, backend, allow_unbounded):
            break
        small, s = trial, s - lo
    tokens = small.shape[2]
    return small, f"cut from {list(x.shape)} to the failing (batch, head) and {tokens} token{'s' * (tokens != 1)}"


def _values(x: torch.Tensor) -> str:
    """Code that rebuilds ``x`` exactly: its values inline, or a file they were saved to."""
    device = "" if x.device.type == "cpu" else f", device={str(x.device)!r}"
    if x.numel() <= INLINE_VALUES:
        return f"torch.tensor({x.cpu().tolist()!r}, dtype={x.dtype}{device})"
    fd, path = tempfile.mkstemp(prefix="qkv-bound-failure-", suffix=".pt")
    os.close(fd)
    torch.save(x.cpu().clone(), path)
    to = f".to({str(x.device)!r})" if device else ""
    return f"torch.load({path!r}){to}  # {list(x.shape)} {x.dtype}"


def _report(policy, tensor, name, x, x_hat, bound, bad, backend, allow_unbounded, minimize) -> str:
    lines = [f"policy {policy}, input {name} {list(x.shape)} {x.dtype}, backend {backend}:"]
    violated = bound.violations(x, x_hat)
    if bool(violated.any()):
        lines.append("  " + describe_violation(bound, x, x_hat, violated, name))
        worst = worst_index(bound, x, x_hat, violated)
    else:  # only unbounded elements
        lines.append(
            f"  {name}: {int(bad.sum())} of {bad.numel()} have no guarantee (bound = inf: a value "
            "overflowed a storage format); pass allow_unbounded=True to accept that"
        )
        worst = tuple(int(i) for i in torch.nonzero(bad)[0])
    small, how = _minimize(tensor, x, worst, backend, allow_unbounded) if minimize else (x, "not minimized")
    call = "" if backend == "auto" else f", backend={backend!r}"
    build = f"qkv.build_policy({tensor.spec!r}).k"
    if not _rebuilds(tensor):
        build = f"...  # {tensor!r}: a component is not registered under its name; build it in code"
    lines += [
        f"minimal failing example ({how}):",
        "    import torch, qkv",
        f"    tensor = {build}",
        f"    x = {_values(small)}",
        f"    ct = tensor.compress(x{call})",
        f"    x_hat = tensor.decompress(ct{call})",
        "    tensor.error_bound(ct, x_hat).check(x, x_hat)",
    ]
    return "\n".join(lines)


def _rebuilds(tensor: TensorPolicy) -> bool:
    """Whether the tensor policy's spec rebuilds it (every component registered under its name)."""
    try:
        return build_policy(tensor.spec).k == tensor
    except QKVError:
        return False
