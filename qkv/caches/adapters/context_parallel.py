"""diffusers' context parallelism around the qkv attention processors.

``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r))`` puts
hooks on a diffusers transformer that split every sequence over the ``r * u`` ranks of its
(ring, ulysses) mesh (rank ``i`` of the flattened mesh holds the i-th contiguous ``1 / (r * u)``
of the tokens) and gather the output; its attention processors see their rank's tokens only, and
diffusers' attention then exchanges them as :class:`ContextParallel` does here. A qkv processor
replaces that attention, so it moves the tokens itself, with the cache in the middle:

- **Ulysses** (within a ring rank's ``u`` ranks): q/k/v [B, S/(r*u), H, D] go through one
  all-to-all to [B, S/r, H/u, D], all of the ring rank's tokens of ``H/u`` heads (rank ``i`` of
  the Ulysses group holds heads ``i*H/u .. (i+1)*H/u``: diffusers' layout), and the attention
  output comes back by the inverse all-to-all. A rank's cache holds, compresses and attends to
  its heads only. Compression treats every (batch, head) row on its own and k-means's random draws
  are shared by all rows, so head ``h`` of a rank stores the same bytes as head ``h`` of a
  one-process cache.
- **Ring** (over the ``r`` ring ranks): a rank's cache holds its token shard of every chunk. The
  queries of all ring ranks are gathered, every rank attends all of them to its own keys (history
  and chunk) as a partial result (out, log-sum-exp), and one all-to-all hands each rank the ``r``
  partials of its queries, merged by log-sum-exp in rank order. A span is compressed on each rank
  over its shard of the span's tokens.

``ulysses_anything`` / ``ring_anything`` (uneven splits) are refused with :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.distributed as dist

from qkv import kernels
from qkv.caches.sharding import head_range
from qkv.errors import ConfigError, ShapeError

__all__ = ["ContextParallel", "refuse_context_parallel"]


def _config(model):
    """The ``ContextParallelConfig`` diffusers' ``enable_parallelism`` recorded on ``model``, or None."""
    return getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)


def refuse_context_parallel(model, client: str, why: str) -> None:
    """Raise :class:`ConfigError` if ``model`` runs under diffusers' context parallelism."""
    if _config(model) is not None:
        raise ConfigError(f"{client}: context parallelism is not supported: {why}")


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """This rank's place in a diffusers context-parallel mesh: its Ulysses group (size, rank)
    and its ring group (size, rank)."""

    ulysses_group: object
    ulysses_world: int
    ulysses_rank: int
    ring_group: object
    ring_world: int
    ring_rank: int

    @classmethod
    def of(cls, model, client: str) -> "ContextParallel | None":
        """The context parallelism diffusers set up on ``model`` (``enable_parallelism``), or None."""
        cp = _config(model)
        if cp is None:
            return None
        if cp.ulysses_anything or cp.ring_anything:
            raise ConfigError(f"{client}: ulysses_anything / ring_anything (uneven splits) are not supported; use "
                              "sequence lengths and head counts that the degrees divide")
        # the meshes and local ranks ContextParallelConfig.setup records (diffusers' attention reads the same)
        return cls(cp._ulysses_mesh.get_group(), cp.ulysses_degree, cp._ulysses_local_rank,
                   cp._ring_mesh.get_group(), cp.ring_degree, cp._ring_local_rank)

    @property
    def ring(self) -> bool:
        """Whether keys are split over ring ranks (attention merges partial results)."""
        return self.ring_world > 1

    def heads(self, total: int) -> tuple[int, int]:
        """This rank's heads ``[start, stop)`` of ``total``."""
        return head_range(total, self.ulysses_rank, self.ulysses_world)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S_rank, H, D] (this rank's tokens, every head) -> [B, S_rank * u, H / u, D] (the
        ring rank's tokens, this rank's heads), one all-to-all over the Ulysses group."""
        u = self.ulysses_world
        if u == 1:
            return x
        b, s, h, d = x.shape
        self.heads(h)  # raises unless u divides the heads
        send = x.reshape(b, s, u, h // u, d).permute(2, 1, 0, 3, 4).contiguous()  # [u, S, B, H/u, D]
        got = torch.empty_like(send)  # got[i]: rank i's tokens of this rank's heads
        dist.all_to_all_single(got, send, group=self.ulysses_group)
        return got.flatten(0, 1).permute(1, 0, 2, 3)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_heads`: [B, S_rank * u, H / u, D] -> [B, S_rank, H, D]."""
        u = self.ulysses_world
        if u == 1:
            return x
        b, s, h, d = x.shape
        if s % u:
            raise ShapeError(f"{s} tokens cannot be split evenly over {u} Ulysses ranks")
        send = x.reshape(b, u, s // u, h, d).permute(1, 2, 0, 3, 4).contiguous()  # [u, S/u, B, H/u, D]
        got = torch.empty_like(send)  # got[i]: this rank's tokens of rank i's heads
        dist.all_to_all_single(got, send, group=self.ulysses_group)
        return got.permute(2, 1, 0, 3, 4).reshape(b, s // u, u * h, d)

    def first_token(self, tokens: int) -> int:
        """Index, within a chunk, of this ring rank's first token when it holds ``tokens`` of them."""
        return self.ring_rank * tokens

    def attend(self, q: torch.Tensor, partial: Callable, backend: str = "auto") -> torch.Tensor:
        """Attention of this rank's queries q [B, H, Sq, D] to the keys of every ring rank:
        ``partial(queries)`` is (out, lse) of ``queries`` [B, H, r * Sq, D] over this rank's keys
        (e.g. :func:`qkv.kernels.attention_partial`). Returns [B, H, Sq, D] in q's dtype."""
        r = self.ring_world
        if r == 1:
            return partial(q)[0].to(q.dtype)
        queries = [torch.empty_like(q) for _ in range(r)]
        dist.all_gather(queries, q.contiguous(), group=self.ring_group)
        out, lse = partial(torch.cat(queries, 2))
        b, h, _, d = out.shape
        both = torch.cat([out.float(), lse.float().unsqueeze(-1)], -1)  # [B, H, r * Sq, D + 1]
        send = both.view(b, h, r, -1, d + 1).permute(2, 0, 1, 3, 4).contiguous()  # [r, B, H, Sq, D + 1]
        got = torch.empty_like(send)  # got[i]: this rank's queries over rank i's keys
        dist.all_to_all_single(got, send, group=self.ring_group)
        state = None
        for part in got:
            state = kernels.merge_partials(state, (part[..., :d], part[..., d]), backend=backend)
        return state[0].to(q.dtype)
