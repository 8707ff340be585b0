"""A drop-in for the Self-Forcing code's per-block KV cache dicts, backed by a :class:`KVCache`.

Self-Forcing (``pipeline/causal_inference.py``) allocates, per transformer block,
``{"k": zeros[B, L, H, D], "v": zeros[B, L, H, D], "global_end_index": tensor([0]),
"local_end_index": tensor([0])}``, and its attention (``CausalWanSelfAttention``) writes and reads
that buffer by slice:

- ``cache["k"][:, start:end] = k`` writes the current chunk (repeatedly: every denoising step
  rewrites the same slots, the final clean pass last);
- when the buffer is full, ``cache["k"][:, sink:sink + n] = cache["k"][:, sink + e:sink + e + n].clone()``
  shifts the history left by ``e`` tokens (eviction after a ``sink``), then the chunk is written;
- ``cache["k"][:, lo:end]`` is read for attention; ``global_end_index`` / ``local_end_index`` are
  read with ``.item()`` and updated with ``.fill_()``.

:func:`self_forcing_kv_cache` returns one :class:`SelfForcingBlockCache` per block that supports
exactly these operations, so the pipeline takes it in place of its list of dicts with no change to
its attention code. A written chunk stays pending (full precision) while it is being rewritten;
the first write of the next chunk appends it to the :class:`LayerCache` (once), which compresses
spans as they complete. A shift is recognised (its values are checked against the cache content)
and becomes :meth:`LayerCache.evict`; its ``sink`` must equal the cache's sink (``sink_chunks``
whole chunks). A write to a slice that is none of these raises :class:`CacheError`.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch
from einops import rearrange

from qkv.caches.kvcache import KVCache, LayerCache
from qkv.errors import CacheError, ShapeError
from qkv.validation import check_kv_values

__all__ = ["SelfForcingBlockCache", "SlotView", "self_forcing_kv_cache"]


def _token_slice(key: object, capacity: int) -> tuple[int, int]:
    """``[:, a:b]`` -> (a, b); anything else raises."""
    if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)):
        raise CacheError(f"only [:, start:end] slices of the token axis are supported, got {key!r}")
    start, stop, step = key[1].indices(capacity)
    if step != 1:
        raise CacheError(f"token slices must have step 1, got {key[1]!r}")
    return start, max(start, stop)


class SlotView:
    """What ``cache["k"]`` / ``cache["v"]`` returns: a [B, L, H, D] buffer read and written by slice."""

    def __init__(self, owner: "SelfForcingBlockCache", name: str) -> None:
        self.owner, self.name = owner, name

    @property
    def shape(self) -> torch.Size:
        return self.owner.buffer_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.owner.dtype

    @property
    def device(self) -> torch.device:
        return self.owner.device

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def __getitem__(self, key: object) -> torch.Tensor:
        a, b = _token_slice(key, self.shape[1])
        return self.owner.read_slots(self.name, a, b)

    def __setitem__(self, key: object, value: torch.Tensor) -> None:
        a, b = _token_slice(key, self.shape[1])
        self.owner.write_slots(self.name, a, b, value)


class SelfForcingBlockCache(MutableMapping):
    """One block's cache dict (keys ``k``, ``v``, ``global_end_index``, ``local_end_index``).

    ``layer``: the :class:`LayerCache` that stores this block; ``capacity``: the buffer length L
    the pipeline sees (``shape[1]``; it decides eviction from it); K/V slots are [B, L, H, D].
    """

    def __init__(self, layer: LayerCache, *, batch_size: int, capacity: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device) -> None:
        self.layer = layer
        self.buffer_shape = torch.Size((batch_size, capacity, heads, head_dim))
        self.dtype, self.device = dtype, torch.device(device)
        self._views = {"k": SlotView(self, "k"), "v": SlotView(self, "v")}
        self._indices = {
            "global_end_index": torch.tensor([0], dtype=torch.long, device=self.device),
            "local_end_index": torch.tensor([0], dtype=torch.long, device=self.device),
        }
        self._pending: dict[str, torch.Tensor] = {}  # name -> [B, n, H, D], the chunk being written
        self._pending_at = (0, 0)
        self._shift: tuple[int, int, int] | None = None  # (a, b, e) of a shift whose K half is done

    # -- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: str):
        if key in self._views:
            return self._views[key]
        return self._indices[key]

    def __setitem__(self, key: str, value) -> None:
        if key in self._views:
            raise CacheError(f"cache[{key!r}] is a compressed store; write slices of it instead of replacing it")
        if key not in self._indices:
            raise KeyError(key)
        self._indices[key] = value

    def __delitem__(self, key: str) -> None:
        raise CacheError("the entries of a Self-Forcing cache dict cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(("k", "v", "global_end_index", "local_end_index"))

    def __len__(self) -> int:
        return 4

    # -- state ---------------------------------------------------------------------------------
    @property
    def filled(self) -> int:
        """Slots holding data: the stored tokens, then the pending chunk."""
        return self.layer.tokens + (self._pending_at[1] - self._pending_at[0])

    def _commit(self) -> None:
        """Append the pending chunk to the layer (once both K and V were written)."""
        if not self._pending:
            return
        if set(self._pending) != {"k", "v"}:
            raise CacheError(f"slots {self._pending_at} were written for {sorted(self._pending)} only, not k and v")
        k, v = (rearrange(self._pending[n], "b s h d -> b h s d") for n in ("k", "v"))
        self.layer.append(k, v)
        self._pending, self._pending_at = {}, (self.layer.tokens, self.layer.tokens)

    def _content(self, name: str) -> torch.Tensor:
        """Everything held for ``name``: [B, filled, H, D]."""
        parts = []
        if self.layer.layout is not None and self.layer.tokens:
            k, v = self.layer.read()
            parts.append(rearrange(k if name == "k" else v, "b h s d -> b s h d"))
        if name in self._pending:
            parts.append(self._pending[name])
        elif self._pending:
            raise CacheError(f"{name} slots {self._pending_at} are read before they were written")
        if not parts:
            b, _, h, d = self.buffer_shape
            return torch.empty(b, 0, h, d, dtype=self.dtype, device=self.device)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def read_slots(self, name: str, a: int, b: int) -> torch.Tensor:
        """``cache[name][:, a:b]``: [B, b - a, H, D] (a copy)."""
        if self._shift is not None and name == "k":
            raise CacheError("k is read between the k and the v half of a shift")
        if b > self.filled:
            raise CacheError(f"slots {a}:{b} read, only {self.filled} hold data")
        return self._content(name)[:, a:b].clone()

    def write_slots(self, name: str, a: int, b: int, value: torch.Tensor) -> None:
        """``cache[name][:, a:b] = value`` (value [B, b - a, H, D])."""
        want = (self.buffer_shape[0], b - a, *self.buffer_shape[2:])
        if not torch.is_tensor(value) or tuple(value.shape) != want:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ShapeError(f"cache[{name!r}][:, {a}:{b}] needs a tensor of shape {want}, got {got}")
        value = value.to(self.dtype)
        if self.layer.config.validate:
            check_kv_values(f"cache[{name!r}][:, {a}:{b}]", value)  # fail here, not when the chunk is committed
        if self.layer.seen and int(self._indices["global_end_index"].item()) == 0 and a == 0:
            self._restart()  # the pipeline reset its indices: a new video starts
        p0, p1 = self._pending_at
        if self._shift is not None or (b < self.filled and (a, b) != (p0, p1)):
            self._write_shift(name, a, b, value)
        elif (a, b) == (p0, p1) and p1 > p0:
            self._pending[name] = value.detach().clone()  # a rewrite of the pending chunk
        elif a == self.filled and self._pending_at[0] != a:
            self._commit()
            self._pending, self._pending_at = {name: value.detach().clone()}, (a, b)
        elif a == p0 and p1 == p0:
            self._pending, self._pending_at = {name: value.detach().clone()}, (a, b)
        else:
            raise CacheError(
                f"cache[{name!r}][:, {a}:{b}] = ... is neither the next chunk (at {self.filled}), a rewrite of "
                f"the pending chunk {self._pending_at}, nor a shift of the history after the sink"
            )

    def _write_shift(self, name: str, a: int, b: int, value: torch.Tensor) -> None:
        """The history after slot ``a`` moves left by ``e = filled - b`` slots."""
        e = self.filled - b
        if self._shift is None:
            sink = sum(c.tokens for c in self.layer.sink)
            if a != sink:
                raise CacheError(
                    f"a shift after slot {a} needs the cache's sink to hold exactly {a} tokens (it holds {sink}): "
                    "set KVCache(sink_chunks=...) to the chunks covering the pipeline's sink frames"
                )
            if name != "k":
                raise CacheError("a shift must move k before v (as Self-Forcing does)")
        elif self._shift != (a, b, e) or name != "v":
            raise CacheError(f"the v half of a shift must match its k half {self._shift}, got {(a, b, e)} for {name}")
        if not torch.equal(value, self._content(name)[:, a + e : b + e]):
            raise CacheError(f"cache[{name!r}][:, {a}:{b}] is written with data that is not the history shifted by {e}")
        if name == "k":
            self._shift = (a, b, e)
            return
        self._shift = None
        self._commit()
        self.layer.evict(e)
        self._pending_at = (self.layer.tokens, self.layer.tokens)

    def _restart(self) -> None:
        self.layer.reset()
        self._pending, self._pending_at, self._shift = {}, (0, 0), None


def self_forcing_kv_cache(
    cache: KVCache,
    *,
    num_blocks: int,
    batch_size: int,
    capacity: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[SelfForcingBlockCache]:
    """Per-block cache dicts for Self-Forcing's ``kv_cache1`` (block i -> ``cache.layer(i)``).

    In ``CausalInferencePipeline._initialize_kv_cache``, replace the list of zero-filled dicts by
    ``self_forcing_kv_cache(qkv.KVCache("qvg", sink_chunks=...), num_blocks=30, batch_size=...,
    capacity=kv_cache_size, heads=12, head_dim=128, dtype=dtype, device=device)``.
    """
    return [
        SelfForcingBlockCache(cache.layer(i), batch_size=batch_size, capacity=capacity, heads=heads,
                              head_dim=head_dim, dtype=dtype, device=device)
        for i in range(num_blocks)
    ]
