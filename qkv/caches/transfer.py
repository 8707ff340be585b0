"""Moving a layer's cache between ranks or to host memory as compressed bytes, never as bf16.

Pipelines that hand the KV cache of a block from one rank to another (StreamDiffusionV2 moves a
block's cache when it rebalances blocks over GPUs) or park it in host memory would otherwise copy
the full-precision history. Here a layer's state (its :meth:`~qkv.caches.layer_cache.LayerCache.state_dict`:
compressed spans, full-precision sink and tail chunks, counters) becomes one contiguous uint8
buffer plus a small JSON header (:func:`pack_layer`), sent in three messages over
``torch.distributed`` (:func:`send_layer` / :func:`recv_layer` / :func:`broadcast_layer`, any
backend: gloo on the CPU, NCCL on GPUs) or copied in one transfer. The round trip is exact, and the
receiving side checks everything it loads as a saved cache is checked (:func:`unpack_layer`).

:func:`send_packed` / :func:`recv_packed` / :func:`broadcast_packed` move any such (buffer, header)
pair; an adapter that keeps more per block than a layer (StreamDiffusionV2's chunk being denoised)
packs it next to the layer with :func:`tensor_entry` and reads it back with :class:`PackedReader`.
Ranks are numbered within ``group`` (the world by default).
"""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from qkv.caches.kvcache import KVCache
from qkv.caches.layer_cache import LayerCache
from qkv.compressed import PACK_ALIGN, CompressedKV, PackedBytes, pack, unpack
from qkv.errors import CorruptDataError, shown
from qkv.io import field, load_device

__all__ = ["PackedReader", "broadcast_layer", "broadcast_packed", "pack_layer", "recv_layer", "recv_packed",
           "send_layer", "send_packed", "tensor_entry", "unpack_layer"]

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def tensor_entry(buf: PackedBytes, t: torch.Tensor) -> dict:
    """Add full-precision ``t``'s bytes to ``buf``; the header entry :meth:`PackedReader.tensor` reads."""
    return {"dtype": str(t.dtype), "shape": list(t.shape), "at": buf.add_tensor(t)}


class PackedReader:
    """Pieces of a packed uint8 ``buffer``, each checked to lie inside it; a bad entry raises
    :class:`CorruptDataError` naming ``where``."""

    def __init__(self, buffer: torch.Tensor, where: str) -> None:
        if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise CorruptDataError(f"{where}: the buffer must be a 1-d uint8 tensor")
        self.buffer, self.where = buffer, where

    def piece(self, at: object, size: int) -> torch.Tensor:
        n = self.buffer.numel()
        if isinstance(at, bool) or not isinstance(at, int) or at < 0 or at % PACK_ALIGN or at + size > n:
            raise CorruptDataError(f"{self.where}: bytes at {shown(at)} (+{size}) outside a buffer of {n}")
        return self.buffer[at : at + size]

    def tensor(self, entry: object) -> torch.Tensor:
        """The full-precision tensor :func:`tensor_entry` described (a copy)."""
        dtype = _DTYPES.get(field(entry, "dtype", str, self.where))
        shape = field(entry, "shape", list, self.where)
        if dtype is None or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise CorruptDataError(f"{self.where}: invalid tensor entry {shown(entry)}")
        return self.piece(entry.get("at"), math.prod(shape) * dtype.itemsize).clone().view(dtype).view(shape)

    def compressed(self, entry: object) -> CompressedKV:
        size = field(entry, "bytes", int, self.where)
        return unpack(self.piece(entry.get("at"), size), field(entry, "packed", dict, self.where))


def pack_layer(layer: LayerCache) -> tuple[torch.Tensor, dict]:
    """(uint8 buffer on the layer's device, JSON-able header) holding ``layer``'s whole state."""
    state = layer.state_dict()
    buf = PackedBytes()

    def compressed(ckv: CompressedKV) -> dict:
        data, header = pack(ckv)
        return {"packed": header, "at": buf.add(data), "bytes": data.numel()}

    header = {key: state[key] for key in ("seen", "evicted", "layout")}
    for part in ("sink", "tail"):
        header[part] = [[tensor_entry(buf, k), tensor_entry(buf, v)] for k, v in state[part]]
    header["spans"] = [[compressed(ckv), skip] for ckv, skip in state["spans"]]
    warm = state["warm"]
    header["warm"] = compressed(warm) if isinstance(warm, CompressedKV) else warm
    return buf.buffer(), header


def unpack_layer(layer: LayerCache, buffer: torch.Tensor, header: dict) -> None:
    """Replace ``layer``'s state by the one :func:`pack_layer` packed (tensors on the buffer's
    device), after checking it as :meth:`LayerCache.load_state_dict` does; a buffer or header that
    does not fit raises :class:`CorruptDataError` and leaves the layer unchanged."""
    where = f"packed layer {layer.index}"
    read = PackedReader(buffer, where)

    def pairs(part: str) -> list:
        return [(read.tensor(k), read.tensor(v)) for k, v in _pairs(field(header, part, list, where), where)]

    warm = header.get("warm")
    state = {
        **{key: header.get(key) for key in ("seen", "evicted", "layout")},
        "sink": pairs("sink"),
        "tail": pairs("tail"),
        "spans": [(read.compressed(entry), skip) for entry, skip in _pairs(field(header, "spans", list, where), where)],
        "warm": read.compressed(warm) if isinstance(warm, dict) else warm,
    }
    layer.load_state_dict(state, buffer.device)


def _pairs(items: list, where: str) -> list:
    if not all(isinstance(item, list) and len(item) == 2 for item in items):
        raise CorruptDataError(f"{where}: expected pairs, found {shown(items)}")
    return items


def _wire_device(group=None) -> torch.device:
    """Where messages live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _world_rank(group, rank: int) -> int:
    """The world rank of rank ``rank`` of ``group`` (what torch's point-to-point calls take)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def _messages(buffer: torch.Tensor, header: dict, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = _wire_device(group)
    text = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8, device=device)
    sizes = torch.tensor([text.numel(), buffer.numel()], dtype=torch.int64, device=device)
    return sizes, text, buffer.to(device)


def _header(text: torch.Tensor, where: str) -> dict:
    try:
        header = json.loads(bytes(text.cpu().tolist()).decode())
    except (UnicodeDecodeError, ValueError):
        raise CorruptDataError(f"{where}: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{where}: the header is not a JSON object")
    return header


def send_packed(buffer: torch.Tensor, header: dict, dst: int, group=None) -> int:
    """Send a packed ``buffer`` (uint8) and its JSON-able ``header`` to rank ``dst`` of ``group``
    in three messages; returns the bytes sent (header and buffer). The receiver calls
    :func:`recv_packed`."""
    sizes, text, buffer = _messages(buffer, header, group)
    for message in (sizes, text, buffer):
        dist.send(message, _world_rank(group, dst), group=group)
    return text.numel() + buffer.numel()


def recv_packed(src: int, group=None, where: str = "packed message") -> tuple[torch.Tensor, dict]:
    """(buffer where messages live, header) that rank ``src`` of ``group`` sent with
    :func:`send_packed`; a header that is not a JSON object raises :class:`CorruptDataError`."""
    wire, src = _wire_device(group), _world_rank(group, src)
    sizes = torch.empty(2, dtype=torch.int64, device=wire)
    dist.recv(sizes, src, group=group)
    text = torch.empty(int(sizes[0]), dtype=torch.uint8, device=wire)
    buffer = torch.empty(int(sizes[1]), dtype=torch.uint8, device=wire)
    dist.recv(text, src, group=group)
    dist.recv(buffer, src, group=group)
    return buffer, _header(text, where)


def broadcast_packed(packed: tuple[torch.Tensor, dict] | None, src: int, group=None,
                     where: str = "packed message") -> tuple[torch.Tensor, dict, int]:
    """Give every rank of ``group`` rank ``src``'s ``packed`` (buffer, header) (None on the other
    ranks); every rank calls it. Returns (buffer where messages live, header, bytes broadcast)."""
    wire, mine, world_src = _wire_device(group), dist.get_rank(group) == src, _world_rank(group, src)
    if mine:
        sizes, text, buffer = _messages(*packed, group)
    else:
        sizes = torch.empty(2, dtype=torch.int64, device=wire)
    dist.broadcast(sizes, world_src, group=group)
    if not mine:
        text = torch.empty(int(sizes[0]), dtype=torch.uint8, device=wire)
        buffer = torch.empty(int(sizes[1]), dtype=torch.uint8, device=wire)
    dist.broadcast(text, world_src, group=group)
    dist.broadcast(buffer, world_src, group=group)
    return buffer, (packed[1] if mine else _header(text, where)), text.numel() + buffer.numel()


def send_layer(cache: KVCache, index: int, dst: int, group=None) -> int:
    """Send layer ``index`` of ``cache`` to rank ``dst`` of ``group`` as compressed bytes; returns
    the bytes sent (header and buffer). The receiver calls :func:`recv_layer`."""
    return send_packed(*pack_layer(cache.layer(index)), dst, group)


def recv_layer(cache: KVCache, index: int, src: int, group=None, device=None) -> None:
    """Receive into layer ``index`` of ``cache`` what rank ``src`` of ``group`` sent with
    :func:`send_layer` (tensors on ``device``; default where messages live)."""
    where = f"packed layer {index}"
    buffer, header = recv_packed(src, group, where)
    unpack_layer(cache.layer(index), buffer.to(load_device(device or buffer.device)), header)


def broadcast_layer(cache: KVCache, index: int, src: int, group=None, device=None) -> int:
    """Give every rank of ``group`` rank ``src``'s layer ``index`` as compressed bytes; every rank
    calls it. Returns the bytes broadcast."""
    packed = pack_layer(cache.layer(index)) if dist.get_rank(group) == src else None
    buffer, header, sent = broadcast_packed(packed, src, group, f"packed layer {index}")
    if packed is None:
        unpack_layer(cache.layer(index), buffer.to(load_device(device or buffer.device)), header)
    return sent
