"""Hot-path operations, each with a plain-PyTorch reference and one dispatcher.

Every policy calls these functions; none has a private copy. ``backend`` picks the
implementation: ``"torch"`` (the reference, runs anywhere), ``"triton"`` (the kernels in
:mod:`qkv.kernels.triton`, on CUDA, or on the CPU under ``TRITON_INTERPRET=1``) or ``"auto"``
(Triton for CUDA tensors when Triton imports and the kernel supports the case, the reference
otherwise). Triton is imported only when a Triton implementation is asked for.
"""

from __future__ import annotations

import enum
import functools
import importlib
from collections.abc import Callable

import torch

from qkv.compressed import CompressedTensor
from qkv.dtypes import saturate
from qkv.errors import BackendError, ConfigError, DeviceError, DTypeError, ShapeError
from qkv.format import AffineFormat, Undo
from qkv.kernels.attention import (
    attention_decode_torch,
    attention_partial,
    attention_staged,
    attention_torch,
    check_attention,
    merge_torch,
)
from qkv.kernels.hadamard import hadamard_torch
from qkv.kernels.kmeans import assign_torch, far_tokens_torch, kmeanspp_torch, reseed_torch, update_torch
from qkv.kernels.quantize import QuantizedRows, dequantize_torch, quantize_pack_torch, rows_dim
from qkv.kernels.segments import CompressedSpan, DenseKV, SpanPlan, decompress_spans_torch


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


class Method(str, enum.Enum):
    """How :func:`attention` reads a history (docs/attention.md says which case takes which)."""

    AUTO = "auto"
    DECODE = "decode"
    FUSED = "fused"
    STAGED = "staged"


# The most queries per head that "auto" gives the decode kernel: few queries read the cache once
# for all of them (memory-bound); more share a key tile the way the prefill paths do
DECODE_MAX_QUERIES = 64

OPS = ("quantize_pack", "dequantize", "kmeans_assign", "kmeans_update", "kmeans_far", "kmeans_reseed", "kmeanspp",
       "hadamard", "attention", "attention_decode", "merge", "decompress_spans")

_TORCH: dict[str, Callable] = {
    "quantize_pack": quantize_pack_torch,
    "dequantize": dequantize_torch,
    "kmeans_assign": assign_torch,
    "kmeans_update": update_torch,
    "kmeans_far": far_tokens_torch,
    "kmeans_reseed": reseed_torch,
    "kmeanspp": kmeanspp_torch,
    "hadamard": hadamard_torch,
    "attention": attention_torch,
    "attention_decode": attention_decode_torch,
    "merge": merge_torch,
    "decompress_spans": decompress_spans_torch,
}


@functools.cache
def _triton_module():
    """qkv.kernels.triton, imported on first use (once: every kernel call resolves through here);
    the ImportError if Triton is absent."""
    try:
        return importlib.import_module("qkv.kernels.triton")
    except ImportError as exc:
        return exc


def triton_impl(op: str) -> tuple[Callable, Callable | None]:
    """(kernel wrapper, supports-check) of ``op``; imports Triton. Raises BackendError if absent."""
    module = _triton_module()
    if isinstance(module, ImportError):
        raise BackendError(f"the triton backend needs the triton package ({module})") from None
    return module.IMPLS[op]


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" and not isinstance(_triton_module(), ImportError)


def resolve(op: str, backend: Backend | str, device: torch.device, *args) -> Callable:
    """The implementation of ``op`` for ``backend``; ``args`` are the call's arguments, used to
    check that a Triton kernel supports the case."""
    try:
        choice = Backend(backend)
    except ValueError:
        valid = ", ".join(b.value for b in Backend)
        raise BackendError(f"unknown backend {backend!r}; valid backends: {valid}") from None
    if choice is Backend.TORCH or (choice is Backend.AUTO and not _triton_usable(device)):
        return _TORCH[op]
    fn, supports = triton_impl(op)
    reason = supports(*args) if supports is not None else None
    if reason is None:
        return fn
    if choice is Backend.TRITON:
        raise BackendError(f"the triton {op} kernel does not support this case: {reason}")
    return _TORCH[op]


def quantize_pack(
    x, fmt: AffineFormat, *, centroids=(), assignments=(), backend: Backend | str = "auto"
) -> QuantizedRows:
    """Quantize rows ``x - sum_t centroids[t][assignments[t]]`` [N, R, L] in blocks along L as
    ``fmt`` says and pack the codes, without materializing the difference (see kernels.quantize;
    the mirror image of :func:`dequantize`). x: fp32/fp16/bf16; centroids[t] [N, C_t, D],
    assignments[t] [N, S]."""
    args = (x, fmt, tuple(centroids), tuple(assignments))
    return resolve("quantize_pack", backend, x.device, *args)(*args)


def dequantize(
    rows, fmt: AffineFormat, tokens, centroids, assignments, *, out_dtype=torch.float32, out=None, backend="auto"
):
    """Unpack + dequantize + add every stage's centroids -> [N, tokens, D] in ``out_dtype``,
    written into ``out`` when given (a tensor of that shape and dtype, unit stride along D)."""
    if out is not None:
        _check_out(out, (rows.codes.shape[0], tokens, rows_dim(rows, fmt)), out_dtype, rows.codes.device)
    args = (rows, fmt, tokens, centroids, assignments, out_dtype, out)
    return resolve("dequantize", backend, rows.codes.device, *args)(*args)


def _check_out(out: torch.Tensor, shape, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ShapeError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise DTypeError(f"out has dtype {out.dtype}, expected {dtype}")
    if out.device != device:
        raise DeviceError(f"out is on {out.device}, the compressed data on {device}")
    if out.stride(-1) != 1:
        raise ShapeError(f"out must have unit stride along its last dimension (strides {out.stride()})")


def decompress(ct: CompressedTensor, *, out: torch.Tensor | None = None, backend: Backend | str = "auto",
               rotated: bool = False) -> torch.Tensor:
    """Reconstruct a compressed tensor [B, H, S, D] in the dtype it was compressed from, from its
    data and format alone: codes dequantized with every add-back stage fused in (or rotations
    undone after), then the full-precision tokens. With ``out`` (a [B, H, S, D] tensor of that
    dtype, unit stride along D, e.g. a slice of a longer buffer along S) the result is written
    there: the add-back kernels write it directly, without an intermediate copy. ``rotated``: a
    Hadamard-rotated tensor is left in its stored basis (its rotations not undone), as attention
    with rotated queries reads it, its full-precision tokens (stored unrotated) rotated into it."""
    b = ct.shape[0]
    fmt = ct.format
    if out is not None:
        _check_out(out, ct.shape, ct.dtype, ct.device)
    q = ct.quantized_tokens
    undo = fmt.undo is Undo.ROTATE and not rotated  # rotations to undo after dequantizing
    fp_tokens = ct.fp_tokens
    if rotated and fmt.undo is Undo.ROTATE and fp_tokens is not None:
        # stored unrotated: taken into the stored basis in fp32, rounded once
        fp_tokens = fp_tokens.float()
        for _ in ct.stages:
            fp_tokens = hadamard(fp_tokens, backend=backend)
        fp_tokens = fp_tokens.to(ct.dtype)
    quantized = None  # the quantized tokens [B, H, q, D], unless the kernel wrote them into out
    if q and fmt.cast is not None:
        quantized = saturate(ct.codes, ct.dtype)
    elif q:
        rows = QuantizedRows(*(None if t is None else t.flatten(0, 1) for t in (ct.codes, ct.scales, ct.zeros, ct.scale_mult)))
        add = fmt.undo is Undo.ADD
        centroids = [s.centroids.flatten(0, 1) for s in ct.stages] if add else []
        assignments = [ct.stage_assignments(i) for i in range(len(ct.stages))] if add else []
        # add-backs are undone inside the kernel, which then writes the output dtype directly
        out_dtype = torch.float32 if undo else ct.dtype
        target = None
        if out is not None and not undo and out.stride(0) == out.shape[1] * out.stride(1):
            target = out[:, :, :q].flatten(0, 1)  # a view: the kernel writes into out
        rec = dequantize(rows, fmt.codes, q, centroids, assignments, out_dtype=out_dtype, out=target, backend=backend)
        if undo:
            for _ in ct.stages:
                rec = hadamard(rec, backend=backend)
        if target is None:
            quantized = saturate(rec.unflatten(0, (b, -1)), ct.dtype)
    if out is None:
        parts = [p for p in (quantized, fp_tokens) if p is not None]
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    if quantized is not None:
        out[:, :, :q].copy_(quantized)
    if fp_tokens is not None:
        out[:, :, q:].copy_(fp_tokens)
    return out


def decompress_spans(plan: SpanPlan, k_out: torch.Tensor, v_out: torch.Tensor, *, backend: Backend | str = "auto",
                     rotated: tuple[bool, bool] = (False, False)) -> None:
    """Write the live keys and values of every span of ``plan``, in order, into ``k_out`` and
    ``v_out`` ([B, H_kv, plan.tokens, D] in the spans' dtype, unit stride along D): the Triton
    kernel reads the plan's span table (built once, kept in the plan) in one launch for K and V,
    where decompressing span by span costs launches and host work per span. ``rotated`` (for K,
    for V): Hadamard-rotated tensors left in their stored basis (:func:`decompress`)."""
    if plan.meta is None:
        raise ShapeError("decompress_spans: the plan holds no span")
    shape, dtype, device = plan.meta
    for out in (k_out, v_out):
        _check_out(out, shape, dtype, device)
    rotated = tuple(rotated)
    if len(rotated) != 2 or not all(isinstance(r, bool) for r in rotated):
        raise ShapeError(f"decompress_spans: rotated must be two bools (K, V), got {rotated!r}")
    args = (plan, k_out, v_out, rotated)
    resolve("decompress_spans", backend, device, *args)(*args)


def kmeans_assign(x, centroids, *, scale=None, sums=False, peaks=False, redo=None, backend="auto"):
    """Nearest centroid of each token of ``x`` [N, S, D] times ``scale`` [N] (a power of two per
    row, applied as it is read: no scaled copy): ([N, S] int64, squared distances [N, S]). With
    ``sums``, a third element: the :class:`~qkv.kernels.kmeans.ClusterSums` of the assignments,
    summed in the same pass over the tokens, for :func:`kmeans_update`; or None where the kernel
    leaves the sums to the update (the Triton kernel beyond ``FUSED_MAX_CLUSTERS`` clusters or 128
    dims). ``peaks``: also each row's max |x| from the same read ([N] fp32, last); ``redo``: an
    earlier result of this call to correct in place for the rows whose ``scale`` is not 1 (see
    :func:`qkv.kernels.kmeans.assign_torch`)."""
    args = (x, centroids, scale, sums, peaks, redo)
    return resolve("kmeans_assign", backend, x.device, *args)(*args)


def kmeans_update(x, assignments, centroids, *, scale=None, sums=None, backend="auto"):
    """Deterministic cluster means of ``x`` times ``scale`` (as in :func:`kmeans_assign`); empty
    clusters keep ``centroids`` (:func:`kmeans_reseed` moves them): ([N, C, D], counts [N, C]).
    ``sums``: the assignment pass's sums of ``assignments`` (or None: summed here)."""
    args = (x, assignments, centroids, scale, sums)
    return resolve("kmeans_update", backend, x.device, *args)(*args)


def kmeans_far(dist, k: int, per_pick: int, *, counts=None, backend="auto"):
    """[N, k] distinct tokens far from their centroids, farthest first, from the squared
    distances ``dist`` [N, S] of an assignment pass: the farthest token of each of the k farthest
    of ``per_pick * k`` equal segments of the span (see
    :func:`qkv.kernels.kmeans.far_tokens_torch`); what :func:`kmeans_reseed` moves empty clusters
    onto. ``counts`` [N, C]: the clusters' sizes (from :func:`kmeans_update`); a row with no
    empty cluster then gets -1s, and the Triton kernels skip its work."""
    if dist.dim() != 2 or dist.dtype != torch.float32:
        raise ShapeError(f"kmeans_far: dist must be [N, S] float32, got {list(dist.shape)} {dist.dtype}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dist.shape[1]:
        raise ShapeError(f"kmeans_far: {k!r} far tokens of {dist.shape[1]} (needs an int, 1 <= k <= S)")
    if isinstance(per_pick, bool) or not isinstance(per_pick, int) or per_pick < 1:
        raise ShapeError(f"kmeans_far: per_pick={per_pick!r} (needs an int >= 1)")
    if counts is not None and (counts.dim() != 2 or counts.shape[0] != dist.shape[0]):
        raise ShapeError(f"kmeans_far: counts must be [N, C] with N = {dist.shape[0]}, got {list(counts.shape)}")
    args = (dist, k, per_pick, counts)
    return resolve("kmeans_far", backend, dist.device, *args)(*args)


def kmeans_reseed(means, counts, x, far, *, scale=None, backend="auto"):
    """The empty clusters (``counts`` [N, C] == 0) of the means [N, C, D] fp32 of
    :func:`kmeans_update` moved onto tokens of ``x`` [N, S, D] times ``scale``: the j-th empty
    cluster of a row (in cluster order) onto token ``far[n, min(j, K - 1)]`` of ``far`` [N, K]
    (:func:`kmeans_far`; unread in a row without an empty cluster). In place; returns ``means``."""
    if means.dim() != 3 or means.dtype != torch.float32:
        raise ShapeError(f"kmeans_reseed: means must be [N, C, D] float32, got {list(means.shape)} {means.dtype}")
    n, c, d = means.shape
    if counts.shape != (n, c) or x.dim() != 3 or x.shape[0] != n or x.shape[2] != d:
        raise ShapeError(f"kmeans_reseed: means {list(means.shape)}, counts {list(counts.shape)} and tokens "
                         f"{list(x.shape)} do not match ([N, C, D], [N, C], [N, S, D])")
    if far.dim() != 2 or far.shape[0] != n or far.shape[1] < 1:
        raise ShapeError(f"kmeans_reseed: far tokens must be [{n}, K] with K >= 1, got {list(far.shape)}")
    args = (means, counts, x, far, scale)
    return resolve("kmeans_reseed", backend, means.device, *args)(*args)


def kmeanspp(points, weights, draws, clusters: int, *, backend="auto"):
    """Weighted D^2 sampling of ``clusters`` C points over ``points`` [N, K, D] (any float dtype,
    computed in fp32) with ``weights`` [N, K], in R rounds of picks, one row of exponential
    variates ``draws`` [R, K] per round (R = C: k-means++): [N, C] distinct point indices (see
    :func:`qkv.kernels.kmeans.kmeanspp_torch`)."""
    if points.dim() != 3 or weights.shape != points.shape[:2] or draws.dim() != 2 or draws.shape[1] != points.shape[1]:
        raise ShapeError(f"kmeanspp: points must be [N, K, D], weights [N, K] and draws [R, K]; got "
                         f"{list(points.shape)}, {list(weights.shape)} and {list(draws.shape)}")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= points.shape[1]:
        raise ShapeError(f"kmeanspp: {clusters!r} picks from {points.shape[1]} points (needs 1 <= C <= K)")
    if not 1 <= draws.shape[0] <= clusters or (clusters > 1) != (draws.shape[0] > 1):
        raise ShapeError(f"kmeanspp: {draws.shape[0]} rounds for {clusters} picks (needs 2 <= R <= C, or R = C = 1)")
    args = (points, weights, draws, clusters)
    return resolve("kmeanspp", backend, points.device, *args)(*args)


def hadamard(x, *, backend="auto"):
    """Normalized Walsh-Hadamard transform along the last dim (self-inverse)."""
    return resolve("hadamard", backend, x.device, x)(x)


def choose_method(q, method: Method | str = "auto") -> Method:
    """The path :func:`attention` takes for queries ``q`` [B, H, Sq, D]: ``method`` unless it is
    ``"auto"``; then the decode kernel for at most :data:`DECODE_MAX_QUERIES` queries per head
    (memory-bound: it reads the compressed cache once, split across the GPU), the staged path for
    more on a GPU (compute-bound: torch's fused attention over one decompressed span at a time runs
    at bf16 speed, the fused kernel at a third of it), the fused op otherwise (on a CPU: its
    plain-torch twin). Raises BackendError naming the valid methods."""
    try:
        choice = Method(method)
    except ValueError:
        valid = ", ".join(m.value for m in Method)
        given = repr(method) if isinstance(method, str) else f"of type {type(method).__name__}"
        raise BackendError(f"unknown attention method {given}; valid methods: {valid}") from None
    if choice is not Method.AUTO:
        return choice
    if q.shape[2] <= DECODE_MAX_QUERIES:
        return Method.DECODE
    return Method.STAGED if q.device.type == "cuda" else Method.FUSED


def attention(q, segments, *, scale=None, backend="auto", method: Method | str = "auto", live=None):
    """softmax(q k^T * scale) v of q [B, H, Sq, D] over every key of ``segments`` (DenseKV,
    CompressedSpan and SpanPlan, [B, H_kv, S, D] each; not causal): [B, H, Sq, D] in q's dtype.
    ``method`` (:func:`choose_method`): ``"decode"`` (flash-decoding over the compressed spans,
    kernels.triton.decode), ``"fused"`` (the prefill kernel decodes tiles in registers,
    kernels.triton.attention), ``"staged"`` (:func:`attention_staged`) or ``"auto"``.

    ``live``: an int32 tensor of one element on q's device: of the last segment (a DenseKV) only
    the first ``live`` keys count, the rest is room; the decode kernel reads the count from the
    device when it runs, so a call replayed from a CUDA graph attends to a tail that grew since
    the capture (the caller updates ``live``, at most the segment's length; its twin reads it back).
    Decode path only."""
    check_attention(q, segments)
    chosen = choose_method(q, method)
    args = (q, segments, scale)
    if live is not None:
        _check_live(q, segments, live, chosen)
        args = (*args, live)
    if chosen is Method.STAGED:
        return attention_staged(q, segments, scale=scale, backend=backend)
    if chosen is Method.DECODE:
        try:
            return resolve("attention_decode", backend, q.device, *args)(*args)
        except BackendError:
            if Method(method) is not Method.AUTO or live is not None:
                raise
            # a span the decode kernel cannot read: the fused op decompresses it on its own
    return resolve("attention", backend, q.device, *args)(*args)


def _check_live(q, segments, live, chosen: Method) -> None:
    """Typed errors for a ``live`` count :func:`attention` cannot take."""
    if chosen is not Method.DECODE:
        raise ConfigError(f"attention: live counts are read by the decode path only, not {chosen.value!r} "
                          f"({q.shape[2]} queries a head)")
    if not isinstance(segments[-1], DenseKV):
        raise ShapeError(f"attention: with live, the last segment must be a DenseKV, got {type(segments[-1]).__name__}")
    if not torch.is_tensor(live) or live.dtype != torch.int32 or live.numel() != 1 or live.device != q.device:
        got = f"{live.dtype} {list(live.shape)} on {live.device}" if torch.is_tensor(live) else type(live).__name__
        raise ShapeError(f"attention: live must be an int32 tensor of one element on {q.device}, got {got}")


def merge_partials(state, *parts, backend="auto"):
    """Merge partial attentions ``parts`` (each (out [B, H, Sq, D], lse [B, H, Sq]): the
    log-sum-exp of its scaled scores) into the running ``state`` over disjoint keys: softmax over
    the union. A loop over segments starts from None (a new fp32 state) and owns its state:
    ``state``'s tensors are updated in place and returned; ``parts``' are never written. Several
    parts at once cost one pass over the state instead of one each."""
    if not parts:
        raise ShapeError("merge_partials: no part to merge")
    args = (state, *parts)
    return resolve("merge", backend, parts[0][0].device, *args)(*args)


__all__ = [
    "OPS",
    "Backend",
    "CompressedSpan",
    "DenseKV",
    "Method",
    "QuantizedRows",
    "SpanPlan",
    "attention",
    "attention_partial",
    "attention_staged",
    "choose_method",
    "decompress",
    "decompress_spans",
    "dequantize",
    "hadamard",
    "kmeans_assign",
    "kmeans_far",
    "kmeans_reseed",
    "kmeans_update",
    "kmeanspp",
    "merge_partials",
    "quantize_pack",
    "resolve",
]
