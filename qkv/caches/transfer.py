"""Moving a layer's cache between ranks or to host memory as compressed bytes, never as bf16.

Pipelines that hand the KV cache of a block from one rank to another (StreamDiffusionV2 moves a
block's cache when it rebalances blocks over GPUs) or park it in host memory would otherwise copy
the full-precision history. Here a layer's state (its :meth:`~qkv.caches.kvcache.LayerCache.state_dict`:
compressed spans, full-precision sink and tail chunks, counters) becomes one contiguous uint8
buffer plus a small JSON header (:func:`pack_layer`), sent in three messages over
``torch.distributed`` (:func:`send_layer` / :func:`recv_layer` / :func:`broadcast_layer`, any
backend: gloo on the CPU, NCCL on GPUs) or copied in one transfer. The round trip is exact, and the
receiving side checks everything it loads as a saved cache is checked (:func:`unpack_layer`).
"""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from qkv.caches.kvcache import KVCache, LayerCache
from qkv.compressed import PACK_ALIGN, CompressedKV, PackedBytes, pack, unpack
from qkv.errors import CorruptDataError, shown
from qkv.io import field, load_device

__all__ = ["broadcast_layer", "pack_layer", "recv_layer", "send_layer", "unpack_layer"]

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def pack_layer(layer: LayerCache) -> tuple[torch.Tensor, dict]:
    """(uint8 buffer on the layer's device, JSON-able header) holding ``layer``'s whole state."""
    state = layer.state_dict()
    buf = PackedBytes()

    def tensor(t: torch.Tensor) -> dict:
        return {"dtype": str(t.dtype), "shape": list(t.shape), "at": buf.add_tensor(t)}

    def compressed(ckv: CompressedKV) -> dict:
        data, header = pack(ckv)
        return {"packed": header, "at": buf.add(data), "bytes": data.numel()}

    header = {key: state[key] for key in ("seen", "evicted", "layout")}
    for part in ("sink", "tail"):
        header[part] = [[tensor(k), tensor(v)] for k, v in state[part]]
    header["spans"] = [[compressed(ckv), skip] for ckv, skip in state["spans"]]
    warm = state["warm"]
    header["warm"] = compressed(warm) if isinstance(warm, CompressedKV) else warm
    return buf.buffer(), header


def unpack_layer(layer: LayerCache, buffer: torch.Tensor, header: dict) -> None:
    """Replace ``layer``'s state by the one :func:`pack_layer` packed (tensors on the buffer's
    device), after checking it as :meth:`LayerCache.load_state_dict` does; a buffer or header that
    does not fit raises :class:`CorruptDataError` and leaves the layer unchanged."""
    where = f"packed layer {layer.index}"
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise CorruptDataError(f"{where}: the buffer must be a 1-d uint8 tensor")

    def piece(at: object, size: int) -> torch.Tensor:
        if isinstance(at, bool) or not isinstance(at, int) or at < 0 or at % PACK_ALIGN or at + size > buffer.numel():
            raise CorruptDataError(f"{where}: bytes at {shown(at)} (+{size}) outside a buffer of {buffer.numel()}")
        return buffer[at : at + size]

    def tensor(entry: object) -> torch.Tensor:
        dtype = _DTYPES.get(field(entry, "dtype", str, where))
        shape = field(entry, "shape", list, where)
        if dtype is None or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise CorruptDataError(f"{where}: invalid tensor entry {shown(entry)}")
        return piece(entry.get("at"), math.prod(shape) * dtype.itemsize).clone().view(dtype).view(shape)

    def compressed(entry: object) -> CompressedKV:
        size = field(entry, "bytes", int, where)
        return unpack(piece(entry.get("at"), size), field(entry, "packed", dict, where))

    def pairs(part: str) -> list:
        return [(tensor(k), tensor(v)) for k, v in _pairs(field(header, part, list, where), where)]

    warm = header.get("warm")
    state = {
        **{key: header.get(key) for key in ("seen", "evicted", "layout")},
        "sink": pairs("sink"),
        "tail": pairs("tail"),
        "spans": [(compressed(entry), skip) for entry, skip in _pairs(field(header, "spans", list, where), where)],
        "warm": compressed(warm) if isinstance(warm, dict) else warm,
    }
    layer.load_state_dict(state, buffer.device)


def _pairs(items: list, where: str) -> list:
    if not all(isinstance(item, list) and len(item) == 2 for item in items):
        raise CorruptDataError(f"{where}: expected pairs, found {shown(items)}")
    return items


def _wire_device(group) -> torch.device:
    """Where messages live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(layer: LayerCache, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    buffer, header = pack_layer(layer)
    device = _wire_device(group)
    text = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8, device=device)
    sizes = torch.tensor([text.numel(), buffer.numel()], dtype=torch.int64, device=device)
    return sizes, text, buffer.to(device)


def _decode(layer: LayerCache, text: torch.Tensor, buffer: torch.Tensor, device) -> None:
    try:
        header = json.loads(bytes(text.cpu().tolist()).decode())
    except (UnicodeDecodeError, ValueError):
        raise CorruptDataError(f"packed layer {layer.index}: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"packed layer {layer.index}: the header is not a JSON object")
    unpack_layer(layer, buffer.to(load_device(device)), header)


def send_layer(cache: KVCache, index: int, dst: int, group=None) -> int:
    """Send layer ``index`` of ``cache`` to rank ``dst`` as compressed bytes; returns the bytes
    sent (header and buffer). The receiver calls :func:`recv_layer`."""
    sizes, text, buffer = _encode(cache.layer(index), group)
    for message in (sizes, text, buffer):
        dist.send(message, dst, group=group)
    return text.numel() + buffer.numel()


def recv_layer(cache: KVCache, index: int, src: int, group=None, device=None) -> None:
    """Receive into layer ``index`` of ``cache`` what rank ``src`` sent with :func:`send_layer`
    (tensors on ``device``: default the cache's device for the layer, else where messages live)."""
    wire = _wire_device(group)
    sizes = torch.empty(2, dtype=torch.int64, device=wire)
    dist.recv(sizes, src, group=group)
    text = torch.empty(int(sizes[0]), dtype=torch.uint8, device=wire)
    buffer = torch.empty(int(sizes[1]), dtype=torch.uint8, device=wire)
    dist.recv(text, src, group=group)
    dist.recv(buffer, src, group=group)
    _decode(cache.layer(index), text, buffer, device or wire)


def broadcast_layer(cache: KVCache, index: int, src: int, group=None, device=None) -> None:
    """Give every rank of ``group`` rank ``src``'s layer ``index`` (the StreamDiffusionV2 pattern
    when a block changes owner), as compressed bytes; every rank calls it."""
    wire = _wire_device(group)
    if dist.get_rank(group) == src:
        sizes, text, buffer = _encode(cache.layer(index), group)
    else:
        sizes = torch.empty(2, dtype=torch.int64, device=wire)
    dist.broadcast(sizes, src, group=group)
    if dist.get_rank(group) != src:
        text = torch.empty(int(sizes[0]), dtype=torch.uint8, device=wire)
        buffer = torch.empty(int(sizes[1]), dtype=torch.uint8, device=wire)
    dist.broadcast(text, src, group=group)
    dist.broadcast(buffer, src, group=group)
    if dist.get_rank(group) != src:
        _decode(cache.layer(index), text, buffer, device or wire)
