"""Heads sharded across ranks with ``torch.distributed``: each rank caches and compresses its heads.

Under tensor parallelism every rank computes the attention of ``H / world`` heads, so it only ever
holds those heads' K/V. :class:`HeadShardedKVCache` is a :class:`KVCache` over this rank's heads
(contiguous blocks: rank r holds heads ``r*H/world .. (r+1)*H/world``) that also accepts full-head
chunks (it keeps its slice), gathers full-head reads when asked, and sums memory over ranks.

Compression treats every (batch, head) row on its own (k-means's random draws are shared by all
rows, so a head's clustering does not depend on the heads beside it), so the gathered cache
equals, bit for bit, an unsharded :class:`KVCache` with the same options fed the full chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qkv.caches.cache_config import CacheMemory
from qkv.caches.kvcache import KVCache
from qkv.caches.policy import Policy
from qkv.errors import ConfigError, ShapeError

__all__ = ["HeadShardedKVCache", "head_range"]


def head_range(heads: int, rank: int, world: int) -> tuple[int, int]:
    """Heads ``[start, stop)`` of ``rank`` out of ``world`` (``heads`` must divide evenly)."""
    if heads % world:
        raise ConfigError(f"{heads} heads cannot be split evenly over {world} ranks")
    per = heads // world
    return rank * per, (rank + 1) * per


class HeadShardedKVCache(KVCache):
    """A :class:`KVCache` over this rank's heads of ``heads`` in total.

    ``group``: the process group (default: the world). Chunks passed to :meth:`append` may hold all
    heads ([B, heads, S, D]: this rank keeps its slice) or only this rank's heads.
    """

    def __init__(self, policy: Policy | str, *, heads: int, group=None, **options) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("HeadShardedKVCache needs an initialized torch.distributed process group")
        super().__init__(policy, **options)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.heads = heads
        self.head_start, self.head_stop = head_range(heads, self.rank, self.world)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a [B, H, S, D] tensor holding all ``heads`` (or already local)."""
        if x.dim() == 4 and x.shape[1] == self.heads and self.world > 1:
            return x[:, self.head_start : self.head_stop]
        if x.dim() == 4 and x.shape[1] == self.head_stop - self.head_start:
            return x
        raise ShapeError(
            f"rank {self.rank}: chunk has {x.shape[1] if x.dim() == 4 else '?'} heads; expected all {self.heads} "
            f"or this rank's {self.head_stop - self.head_start} ([B, H, S, D])"
        )

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        super().append(layer, self.local(k), self.local(v))

    def read_gathered(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All heads' retained history [B, heads, S, D] (an all-gather over the group)."""
        out = []
        for t in self.read(layer):
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            out.append(torch.cat(parts, dim=1))
        return out[0], out[1]

    def total_memory(self) -> CacheMemory:
        """Memory summed over the ranks (an all-reduce); :meth:`memory` is this rank's."""
        mem = self.memory()
        fields = ("compressed", "sink", "tail", "warm_start", "elements", "reserved")
        t = torch.tensor([getattr(mem, f) for f in fields], dtype=torch.long)
        dist.all_reduce(t, group=self.group)
        return CacheMemory(**{f: int(x) for f, x in zip(fields, t.tolist())}, tokens=mem.tokens,
                           dead_tokens=mem.dead_tokens)
