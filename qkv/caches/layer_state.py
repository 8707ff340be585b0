"""What one layer of a :class:`~qkv.KVCache` holds, as one dataclass, and the one check of what
enters it: a chunk to append, or a whole state to load.

A state dict (:func:`state_dict`) is plain data: counters, the layout, full-precision chunks as
(k, v) tensor pairs, spans as (CompressedKV, skip) and the warm-start centroids. Chunk and span
positions are not stored: they follow from the counters (the sink holds positions from 0, the
retained tokens after it run contiguously up to ``seen``, the ``evicted`` oldest being gone).
:func:`from_state_dict` checks every counter against the others and against the tensors, so a
state that does not add up is rejected instead of read.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from qkv.caches.cache_config import CacheConfig
from qkv.compressed import CompressedKV, CompressedTensor, StageData
from qkv.caches.tail import Chunk
from qkv.dtypes import INPUT_DTYPES
from qkv.errors import CorruptDataError, DeviceError, DTypeError, QKVError, ShapeError, shown
from qkv.kernels import CompressedSpan
from qkv.validation import check_kv_pair, check_kv_values

__all__ = ["LayerState", "Layout", "centroids_only", "check_chunk", "from_state_dict", "shares_centroids", "state_dict"]

DTYPES = {str(d): d for d in INPUT_DTYPES}


class Layout(NamedTuple):
    """What every chunk of a layer shares: ``[batch, heads, ., head_dim]``, dtype and device."""

    batch: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, k: torch.Tensor) -> "Layout":
        return cls(k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)


@dataclasses.dataclass(eq=False)
class LayerState:
    """A layer's sink, spans and tail (in read order), the warm-start centroids and its counters:
    ``seen`` tokens ever appended (the position of the next), ``evicted`` non-sink tokens dropped,
    and the ``layout`` (None until the first append). The sink takes chunks while nothing came
    after it (``seen`` is the sink's tokens) and it holds fewer than ``sink_chunks``, or the first
    ``sink_tokens`` tokens (cutting the chunk that crosses it)."""

    sink: list[Chunk] = dataclasses.field(default_factory=list)
    spans: list[CompressedSpan] = dataclasses.field(default_factory=list)
    tail: list[Chunk] = dataclasses.field(default_factory=list)
    warm: CompressedKV | None = None
    seen: int = 0
    evicted: int = 0
    layout: Layout | None = None


def check_chunk(config: CacheConfig, layout: Layout | None, k: object, v: object, where: str, values: bool) -> None:
    """Raise a typed error (naming the problem) unless ``k``/``v`` [B, H, S, D] can join a layer of
    ``layout`` (None: the first chunk, checked against the policy); ``values``: also finite and in
    range. No side effects."""
    try:
        check_kv_pair(k, v)
    except QKVError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if k.dtype != v.dtype:
        raise DTypeError(f"{where}: k is {k.dtype} but v is {v.dtype}")
    b, h, _, d = k.shape
    if layout is not None:
        if (b, h, d) != layout[:3]:
            raise ShapeError(f"{where}: chunk has [B, H, D] = [{b}, {h}, {d}], the cache holds {list(layout[:3])}")
        if k.dtype != layout.dtype:
            raise DTypeError(f"{where}: chunk is {k.dtype}, the cache holds {layout.dtype}")
        if k.device != layout.device:
            raise DeviceError(f"{where}: chunk is on {k.device}, the cache is on {layout.device}")
    else:
        config.policy.k.check_shape("k", tuple(k.shape))
        config.policy.v.check_shape("v", tuple(v.shape))
    if values:
        check_kv_values(f"{where}: k", k, (f"{where}: v", v))


def state_dict(state: LayerState) -> dict:
    """``state`` as plain data (tensors shared, not copied); see the module docstring."""
    layout = None
    if state.layout is not None:
        b, h, d, dtype, _ = state.layout
        layout = {"batch": b, "heads": h, "head_dim": d, "dtype": str(dtype)}
    warm = state.warm
    if warm is not None and state.spans and shares_centroids(warm, state.spans[-1].ckv):
        warm = "last_span"
    return {
        "seen": state.seen,
        "evicted": state.evicted,
        "layout": layout,
        "sink": [(c.k, c.v) for c in state.sink],
        "tail": [(c.k, c.v) for c in state.tail],
        "spans": [(sp.ckv, sp.skip) for sp in state.spans],
        "warm": warm,
    }


def shares_centroids(warm: CompressedKV, ckv: CompressedKV) -> bool:
    """Whether ``warm``'s centroids are ``ckv``'s (shared storage)."""
    return all(
        w.centroids is s.centroids for a, b in ((warm.k, ckv.k), (warm.v, ckv.v)) for w, s in zip(a.stages, b.stages)
    )


def centroids_only(ckv: CompressedKV) -> CompressedKV:
    """What a warm start needs of a span: its centroids (shared, not copied), nothing else."""

    def strip(ct: CompressedTensor) -> CompressedTensor:
        stages = tuple(StageData(s.centroids, None) for s in ct.stages)
        return dataclasses.replace(
            ct, codes=None, scales=None, zeros=None, scale_mult=None, fp_tokens=None, stages=stages
        )

    return CompressedKV(strip(ckv.k), strip(ckv.v), ckv.spec)


def _count(data: dict, key: str, where: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptDataError(f"{where}: {key} must be an integer >= 0, found {shown(value)}")
    return value


def _layout(data: object, device: torch.device, where: str) -> Layout | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != {"batch", "heads", "head_dim", "dtype"}:
        raise CorruptDataError(f"{where}: layout must be batch, heads, head_dim and dtype, found {shown(data)}")
    sizes = [data[key] for key in ("batch", "heads", "head_dim")]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in sizes):
        raise CorruptDataError(f"{where}: layout sizes must be integers >= 1, found {shown(sizes)}")
    if data["dtype"] not in DTYPES:
        raise CorruptDataError(f"{where}: layout dtype {shown(data['dtype'])} is not one of {', '.join(DTYPES)}")
    return Layout(*sizes, DTYPES[data["dtype"]], device)


def _chunks(config: CacheConfig, layout: Layout, pairs: object, start: int, where: str) -> list[Chunk]:
    """(k, v) pairs as chunks from position ``start`` on, each checked as an append checks it."""
    if not isinstance(pairs, (list, tuple)):
        raise CorruptDataError(f"{where}: expected a list of (k, v) pairs, found {type(pairs).__name__}")
    chunks = []
    for j, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise CorruptDataError(f"{where} {j}: expected a (k, v) pair")
        k, v = pair
        try:
            check_chunk(config, layout, k, v, f"{where} {j}", values=True)
        except QKVError as exc:
            raise CorruptDataError(str(exc)) from None
        chunks.append(Chunk(k, v, start))
        start += k.shape[2]
    return chunks


def _span(config: CacheConfig, layout: Layout, item: object, where: str) -> CompressedSpan:
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], CompressedKV):
        raise CorruptDataError(f"{where}: expected (CompressedKV, skip)")
    ckv, skip = item
    policy = config.span_policy
    if ckv.spec != policy.spec:
        raise CorruptDataError(f"{where}: compressed by {shown(ckv.spec)}, the cache compresses with {policy.spec!r}")
    for name, ct in (("k", ckv.k), ("v", ckv.v)):
        b, h, s, d = ct.shape
        if (b, h, d) != layout[:3] or ct.dtype != layout.dtype:
            raise CorruptDataError(
                f"{where}.{name}: [B, H, S, D] = {list(ct.shape)} {ct.dtype}, the layer holds "
                f"[{layout.batch}, {layout.heads}, S, {layout.head_dim}] {layout.dtype}"
            )
    if ckv.k.shape != ckv.v.shape:
        raise CorruptDataError(f"{where}: k {ckv.k.shape} and v {ckv.v.shape} differ")
    tokens = ckv.k.shape[2]
    longest = None if config.span_tokens is None else max(config.span_tokens, config.residual_group or 0)
    if longest is not None and tokens > longest:
        raise CorruptDataError(f"{where}: {tokens} tokens, the cache's spans hold at most {longest}")
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < tokens:
        raise CorruptDataError(f"{where}: skip must be an integer in [0, {tokens}), found {shown(skip)}")
    for name, tp, ct in (("k", policy.k, ckv.k), ("v", policy.v, ckv.v)):
        if ct.format != tp.format(layout.head_dim):
            raise CorruptDataError(f"{where}.{name}: stored as {ct.format}, the cache's policy stores {tp.spec!r}")
    return CompressedSpan(ckv, skip)


def _warm(config: CacheConfig, layout: Layout, spans: list[CompressedSpan], warm: object, where: str):
    """The warm-start centroids: those of the newest span, or stored ones checked against the
    policy and the layout."""
    if warm is None:
        return None
    if not (config.warm_start and config.clusters):
        raise CorruptDataError(f"{where}: holds warm-start centroids, the cache keeps none")
    if warm == "last_span":
        if not spans:
            raise CorruptDataError(f"{where}: warm start from the last span, but the layer holds no span")
        return centroids_only(spans[-1].ckv)
    if spans:  # each compression keeps the newest span's centroids, and the newest span is never evicted alone
        raise CorruptDataError(f"{where}: spans are stored, so the warm start is the newest span's centroids")
    if not isinstance(warm, CompressedKV):
        raise CorruptDataError(f"{where}: warm start must be 'last_span' or centroids, found {shown(warm)}")
    policy = config.span_policy
    if warm.spec != policy.spec:
        raise CorruptDataError(f"{where}: warm start from {shown(warm.spec)}, the cache compresses with {policy.spec!r}")
    for name, tp, ct in (("k", policy.k, warm.k), ("v", policy.v, warm.v)):
        stages = tp.staging.count if tp.smoothing.needs_groups else 0
        if len(ct.stages) not in (0, stages):
            raise CorruptDataError(f"{where}.{name}: {len(ct.stages)} warm-start stages, the policy has {stages}")
        for i, stage in enumerate(ct.stages):
            c = stage.centroids
            dtype = tp.format(layout.head_dim).stages[i].rows_dtype
            if c is None or c.dim() != 4 or (c.shape[0], c.shape[1], c.shape[3]) != layout[:3] or c.dtype != dtype:
                found = None if c is None else f"{list(c.shape)} {c.dtype}"
                raise CorruptDataError(
                    f"{where}.{name}.stage{i}: centroids must be [{layout.batch}, {layout.heads}, C, "
                    f"{layout.head_dim}] {dtype}, found {found}"
                )
            if not bool(c.float().isfinite().all()):
                raise CorruptDataError(f"{where}.{name}.stage{i}: centroids hold NaN/Inf")
    return warm


def from_state_dict(config: CacheConfig, data: object, device: torch.device, where: str) -> LayerState:
    """The :class:`LayerState` ``data`` describes (tensors already on ``device``), after checking
    that it adds up: every chunk as an append checks it, every span against the policy and the
    layout, and the counters against each other and the tensors. Raises :class:`CorruptDataError`."""
    if not isinstance(data, dict):
        raise CorruptDataError(f"{where}: expected a dict, found {type(data).__name__}")
    seen, evicted = (_count(data, key, where) for key in ("seen", "evicted"))
    layout = _layout(data.get("layout"), device, where)
    if layout is None:
        if seen or evicted or any(data.get(key) for key in ("sink", "tail", "spans", "warm")):
            raise CorruptDataError(f"{where}: holds data or counts tokens but has no layout")
        return LayerState()
    sink = _chunks(config, layout, data.get("sink"), 0, f"{where} sink")
    sink_tokens = sum(c.tokens for c in sink)
    spans_data = data.get("spans")
    if not isinstance(spans_data, (list, tuple)):
        raise CorruptDataError(f"{where}: spans must be a list")
    spans = [_span(config, layout, item, f"{where} span {j}") for j, item in enumerate(spans_data)]
    span_tokens = sum(sp.tokens for sp in spans)
    tail = _chunks(config, layout, data.get("tail"), sink_tokens + evicted + span_tokens, f"{where} tail")
    tail_tokens = sum(c.tokens for c in tail)
    if config.max_spans is not None and len(spans) > config.max_spans:
        raise CorruptDataError(f"{where}: {len(spans)} spans, the cache keeps at most {config.max_spans}")
    after = bool(spans or tail or evicted)
    if config.sink_tokens:
        if sink_tokens > config.sink_tokens or (sink_tokens < config.sink_tokens and after):
            raise CorruptDataError(
                f"{where}: {sink_tokens} sink tokens and {'tokens' if after else 'none'} after them; the sink holds "
                f"the first {config.sink_tokens} tokens"
            )
    elif len(sink) > config.sink_chunks or (len(sink) < config.sink_chunks and after):
        raise CorruptDataError(
            f"{where}: {len(sink)} sink chunks and tokens after them; the sink holds the first {config.sink_chunks} chunks"
        )
    if not sink and not (spans or tail or evicted):
        raise CorruptDataError(f"{where}: a layout but no tokens ever appended")
    if seen != sink_tokens + evicted + span_tokens + tail_tokens:
        raise CorruptDataError(
            f"{where}: {seen} tokens seen, but sink {sink_tokens} + evicted {evicted} + spans {span_tokens} + "
            f"tail {tail_tokens} = {sink_tokens + evicted + span_tokens + tail_tokens}"
        )
    warm = _warm(config, layout, spans, data.get("warm"), where)
    if spans and warm is None and config.warm_start and config.clusters:
        raise CorruptDataError(f"{where}: spans are stored but the warm start the cache keeps from them is not")
    return LayerState(sink, spans, tail, warm, seen, evicted, layout)
