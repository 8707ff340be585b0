"""Attention over a KV history of full-precision and compressed segments: the plain-PyTorch reference.

A history is a sequence of segments (:mod:`qkv.kernels.segments`): :class:`DenseKV` (keys and values
in full precision), :class:`CompressedSpan` (a :class:`~qkv.compressed.CompressedKV`, which describes
itself, and how many of its leading tokens were evicted) and :class:`SpanPlan` (spans planned once).
The attention is not causal: every query sees
every key of every segment (the Wan / Self-Forcing pattern, where a chunk's queries attend to
[history, chunk]), so the order of the segments does not matter.

:func:`attention_torch` decompresses one segment at a time with :func:`qkv.kernels.decompress`, attends to it
in fp32 and merges the partial results by their log-sum-exp, so the whole history is never
materialized at once. The Triton twin (:mod:`qkv.kernels.triton.attention`) reads the compressed
spans directly instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange, repeat

from qkv import kernels
from qkv.errors import DeviceError, DTypeError, ShapeError
from qkv.kernels.segments import CompressedSpan, DenseKV, Segment, SpanPlan, kv_meta, expand

FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# The most keys per head that the staged path decompresses at once (a longer span alone): groups
# of short spans (a chunk per span) then cost as few attention calls and merges as long ones
STAGE_TOKENS = 32768
# Partial results held before they are folded into the running state in one pass (the state is
# read and written once per fold, not once per part; the parts held take at most twice the fp32
# state's bytes when they are bf16)
MERGE_PARTS = 4


def check_attention(q: torch.Tensor, segments: Sequence[Segment]) -> None:
    """Raise a typed error unless ``q`` [B, H, Sq, D] can attend to ``segments`` ([B, H_kv, S, D]
    each, one H_kv for all, H a multiple of it, same device, at least one key)."""
    if not torch.is_tensor(q) or q.dim() != 4:
        raise ShapeError(f"attention: q must be a [B, H, Sq, D] tensor, got {getattr(q, 'shape', type(q))}")
    if q.dtype not in FLOATS:
        raise DTypeError(f"attention: q must be fp32/fp16/bf16, got {q.dtype}")
    if not segments or sum(s.tokens for s in segments) == 0:
        raise ShapeError("attention: the history holds no keys")
    b, h, _, d = q.shape
    segments = [s for s in segments if not isinstance(s, SpanPlan) or s.spans]
    h_kv = kv_meta(segments[0])[0][1]
    for i, seg in enumerate(segments):
        shape, dtype, device = kv_meta(seg)
        if shape[0] != b or shape[3] != d or shape[1] != h_kv or h % h_kv:
            raise ShapeError(
                f"attention: segment {i} has [B, H_kv, S, D] = {list(shape)}, q has [B, H, Sq, D] = "
                f"{list(q.shape)} (needs the same B and D, one H_kv for every segment, and H a multiple of it)"
            )
        if dtype not in FLOATS:
            raise DTypeError(f"attention: segment {i} holds {dtype}, not a float format")
        if device != q.device:
            raise DeviceError(f"attention: segment {i} is on {device}, q on {q.device}")


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def partial_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, Sq, D] to k, v [B, H_kv, S, D] in fp32: (out [B, H, Sq, D], log-sum-exp
    of the scaled scores [B, H, Sq])."""
    group = q.shape[1] // k.shape[1]
    k, v = (repeat(t.float(), "b h s d -> b (h g) s d", g=group) for t in (k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse.unsqueeze(-1)), v), lse


def merge_torch(
    state: tuple[torch.Tensor, torch.Tensor] | None, *parts: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold partial attentions ``parts`` (out [B, H, Sq, D], lse [B, H, Sq]) into the running
    ``state`` (out fp32, lse fp32) over disjoint keys: ``state``'s tensors are updated in place and
    returned (``parts``' never are); None starts a new state. A row that no part has a key for
    (log-sum-exp -inf everywhere) stays output 0, log-sum-exp -inf. See
    :func:`qkv.kernels.merge_partials`."""
    lses = ([] if state is None else [state[1]]) + [lse.float() for _, lse in parts]
    lse = torch.stack(lses).logsumexp(0)
    empty = lse == -math.inf  # a row over no key yet: every weight 0, output 0
    ref = torch.where(empty, 0.0, lse)
    merged = sum(out.float() * torch.exp(part_lse - ref).unsqueeze(-1)
                 for out, part_lse in zip(([] if state is None else [state[0]]) + [o for o, _ in parts], lses))
    merged = torch.where(empty.unsqueeze(-1), 0.0, merged)
    if state is None:
        return merged.contiguous(), lse
    return state[0].copy_(merged), state[1].copy_(lse)


def attention_torch(q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over every key of ``segments``: [B, H, Sq, D] in q's dtype.

    Each segment is decompressed on its own (plain-torch kernels), attended to in fp32 and merged by
    log-sum-exp. ``scale`` defaults to 1 / sqrt(D).
    """
    check_attention(q, segments)
    scale = default_scale(q, scale)
    segments = [seg for seg in expand(segments) if seg.tokens]
    return _merged(q, scale, segments, lambda *args: [partial_attention(*args)], "torch")[0].to(q.dtype)


# Keys per piece of the decode path (the Triton kernel's work item on a GPU)
DECODE_PIECE = 256


def attention_decode_torch(q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None,
                           live: torch.Tensor | None = None) -> torch.Tensor:
    """Flash-decoding, the plain-torch twin of the decode kernel: every segment's keys cut into
    pieces of :data:`DECODE_PIECE`, each piece attended to in fp32 (all query heads of a KV head
    at once) and the partial results merged by log-sum-exp. [B, H, Sq, D] in q's dtype. ``live``:
    see :func:`qkv.kernels.attention` (read back here)."""
    check_attention(q, segments)
    scale = default_scale(q, scale)
    if live is not None:
        last, n = segments[-1], int(live)
        if not 0 <= n <= last.tokens:
            raise ShapeError(f"attention: live={n} keys of a last segment of {last.tokens}")
        segments = [*segments[:-1], DenseKV(last.k[:, :, :n], last.v[:, :, :n])]
    segments = [seg for seg in expand(segments) if seg.tokens]

    def pieces(q, k, v, scale):
        return [partial_attention(q, k[:, :, i : i + DECODE_PIECE], v[:, :, i : i + DECODE_PIECE], scale)
                for i in range(0, k.shape[2], DECODE_PIECE)]

    return _merged(q, scale, segments, pieces, "torch")[0].to(q.dtype)


def _merged(q, scale, segments, attend, backend, stored_basis=False) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend(q, k, v, scale)`` -> the partial results (out, lse) of each segment, decompressed on
    ``backend`` only when its turn comes, merged by log-sum-exp: (out, lse), both fp32.

    ``stored_basis``: a span group whose keys (values) are all Hadamard-rotated once
    (:meth:`SpanPlan.rotations`) is decompressed in their stored basis, as the kernels read such
    spans: its keys meet the rotated queries H q (rounded once to q's dtype, made once a call;
    q . H r = H q . r), its output is rotated back in fp32 (sum p H r = H sum p r). Two
    rotations of the queries' and the output's rows instead of one of every key and value."""
    state, pending, rotated_q = None, [], None
    for seg in segments:
        rot = seg.rotations() if stored_basis and isinstance(seg, SpanPlan) else (False, False)
        k, v = seg.materialize(backend=backend, rotated=rot) if any(rot) else seg.materialize(backend=backend)
        if rot[0] and rotated_q is None:
            rotated_q = kernels.hadamard(q.float(), backend=backend).to(q.dtype)
        parts = attend(rotated_q if rot[0] else q, k, v, scale)
        if rot[1]:
            parts = [(kernels.hadamard(out.float(), backend=backend), lse) for out, lse in parts]
        pending += parts
        del k, v  # before the next segment is decompressed
        if len(pending) >= MERGE_PARTS:  # folded in at once: the state is read and written once
            state, pending = kernels.merge_partials(state, *pending, backend=backend), []
    if pending:
        state = kernels.merge_partials(state, *pending, backend=backend)
    if state is None:
        raise ShapeError("attention over no keys: the segments hold no token")
    return state


# torch's fused attention kernels that also return the log-sum-exp, fastest first on an H100 at
# video shapes (benchmarks/bench_attention.py, "sdpa_backends"): op -> its arguments after q, k, v
_LSE_OPS = {
    "_scaled_dot_product_cudnn_attention": (None, True),
    "_scaled_dot_product_flash_attention": (),
    "_scaled_dot_product_efficient_attention": (None, True),
}


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`partial_attention` with torch's fused kernels: (out [B, H, Sq, D] in q's dtype, lse
    [B, H, Sq] fp32). On CUDA (fp16/bf16) the first of cuDNN, flash and memory-efficient attention
    that accepts the inputs; on the CPU the flash kernel for CPU; the fp32 einsum otherwise (and for
    queries and keys of different dtypes). Inputs whose D is not contiguous are copied first."""
    if q.dtype != k.dtype:
        return partial_attention(q, k, v, scale)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = (repeat(t, "b h s d -> b (h g) s d", g=group) for t in (k, v))
    # the fused kernels read rows of D contiguous values (the CPU one silently misreads others:
    # per-channel keys decompress as a transposed view)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    if q.dtype in (torch.float16, torch.bfloat16):
        for name in _LSE_OPS:
            try:
                return lse_op(name, q, k, v, scale)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:  # this kernel does not take these inputs (dtype, head dim, layout)
                continue
    return partial_attention(q, k, v, scale)


def lse_op(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse [B, H, Sq] fp32) of the torch op ``name`` of :data:`_LSE_OPS` (same heads for q,
    k, v); each op returns its log-sum-exp in its own shape (cuDNN [B, H, Sq, 1], memory-efficient
    padded along Sq)."""
    result = getattr(torch.ops.aten, name)(q, k, v, *_LSE_OPS[name], scale=scale)
    return result[0], result[1].flatten(2)[..., : q.shape[2]].float()


# Keys cut into this many equal pieces, attended to in one fused call as separate batch entries
# (the queries broadcast): as many thread blocks again, so the last wave of a chunk's 4,680 x 12
# query tiles leaves fewer multiprocessors idle (on an H100, one 37,440-token span: 0.85-0.89x the
# time of one piece; 3 or 4 pieces gain little more and cost more merges: benchmarks/
# bench_attention.py "key_split")
KEY_SPLIT = 2


def sdpa_split(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pieces: int = KEY_SPLIT
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sdpa_with_lse` over ``k``, ``v`` cut into ``pieces`` equal pieces along the keys, in
    one call: the partial result (out, lse) of each piece (one piece when the keys do not divide)."""
    n = pieces if k.shape[2] % pieces == 0 else 1
    if n == 1:
        return [sdpa_with_lse(q, k, v, scale)]
    k, v = (rearrange(t, "b h (n s) d -> (b n) h s d", n=n) for t in (k, v))  # views
    out, lse = sdpa_with_lse(repeat(q, "b h s d -> (b n) h s d", n=n), k, v, scale)
    return list(zip(rearrange(out, "(b n) h s d -> n b h s d", n=n), rearrange(lse, "(b n) h s -> n b h s", n=n)))


def attention_staged(
    q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """:func:`attention_torch` at the speed of torch's fused attention, in bounded memory. Keys of
    one dtype with q, :data:`STAGE_TOKENS` or fewer in all (a window: a sink, a few spans, the
    chunk being made), are gathered into one buffer (:func:`gather`) and attended to by one fused
    call, as a bf16 cache is. Otherwise the compressed spans are decompressed
    (:func:`qkv.kernels.decompress_spans` on ``backend``) a group of consecutive spans at a time,
    up to :data:`STAGE_TOKENS` keys (:func:`~qkv.kernels.segments.span_groups`), and each group is attended to by
    :func:`sdpa_split` (a group of Hadamard-rotated spans in its stored basis, with rotated
    queries; see :func:`_merged`); the full-precision segments are concatenated and attended to in one call;
    the partial results are merged by log-sum-exp. At most one decompressed group (or the
    concatenated full-precision keys) exists at a time. The full-precision keys come first: the
    GPU starts on them while the host prepares the first group. [B, H, Sq, D] in q's dtype."""
    check_attention(q, segments)
    scale = default_scale(q, scale)
    live = [seg for seg in segments if seg.tokens]
    if sum(seg.tokens for seg in live) <= STAGE_TOKENS and all(kv_meta(seg)[1] == q.dtype for seg in live):
        k, v = gather(live, backend)
        return sdpa_with_lse(q, k, v, scale)[0]
    return attention_partial(q, segments, scale, backend)[0].to(q.dtype)


def gather(segments: Sequence[Segment], backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of every segment (one dtype), in order, in one buffer each
    [B, H_kv, S, D]: full-precision segments copied, spans decompressed in place
    (:func:`qkv.kernels.decompress_spans`, a plan's or loose spans' table in one launch)."""
    segments = [seg for seg in segments if seg.tokens]
    (b, h, _, d), dtype, device = kv_meta(segments[0])
    total = sum(seg.tokens for seg in segments)
    k, v = (torch.empty(b, h, total, d, dtype=dtype, device=device) for _ in range(2))
    at = 0
    for seg in segments:
        n = seg.tokens
        if isinstance(seg, DenseKV):
            k[:, :, at : at + n].copy_(seg.k)
            v[:, :, at : at + n].copy_(seg.v)
        else:
            kernels.decompress_spans(seg if isinstance(seg, SpanPlan) else SpanPlan([seg]),
                                     k[:, :, at : at + n], v[:, :, at : at + n], backend=backend)
        at += n
    return k, v


def attention_partial(
    q: torch.Tensor, segments: Sequence[Segment], scale: float | None = None, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_staged` before its result is cast: (out [B, H, Sq, D] fp32, lse [B, H, Sq]
    fp32, the log-sum-exp of the scaled scores over every key of ``segments``), a partial result
    that :func:`qkv.kernels.merge_partials` merges with others over disjoint keys (ring attention:
    every rank attends to its own keys). ``segments`` must hold at least one key."""
    check_attention(q, segments)
    scale = default_scale(q, scale)
    dense = [s for s in segments if isinstance(s, DenseKV) and s.tokens]
    if len(dense) > 1:
        dense = [DenseKV(torch.cat([s.k for s in dense], 2), torch.cat([s.v for s in dense], 2))]
    plans = [s for s in segments if isinstance(s, SpanPlan)]
    loose = [s for s in segments if isinstance(s, CompressedSpan)]
    if loose:
        plans.append(SpanPlan(loose))
    groups = [g for plan in plans for g in plan.staged(STAGE_TOKENS)]
    return _merged(q, scale, dense + groups, sdpa_split, backend, stored_basis=True)
