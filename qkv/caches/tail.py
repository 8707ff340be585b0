"""One contiguous buffer for a layer's full-precision tail, so the tail is never concatenated.

Every chunk appended to a layer's tail is written right after the previous one into one
preallocated [2B, H, capacity, D] tensor (keys in the first B rows, values in the last), and the
tail's chunks are views of it. Where the cache needs the tail as one tensor, :func:`joined` turns
adjacent views back into one view instead of copying them: the span to compress (8 chunks of Wan
K/V: 230 MB that ``torch.cat`` copied once per span; its keys and values then stack along the
batch as one view too, :func:`stacked`, for a policy that compresses them in one pass), and the
tail plus the current chunk to attend to (:meth:`TailBuffer.stage`: the current chunk is written
into the free room after the tail, as a bf16 cache does; the concatenation copied the whole tail
on every forward).

The buffer is placed in front again (the tail copied to offset 0) only when a chunk does not fit
after the tail; it grows to the room the cache's configuration needs (a span, the tokens kept after
it, one chunk to attend to), or by half when chunk sizes vary. Chunks that are not views of the
buffer (cut by an eviction, moved by ``to`` or ``index_batch``, loaded from a file) stay correct:
they are joined with nothing, and the next append copies them into the buffer.

Views of the buffer stay valid until the next append (which may move the tail) and hold no
reference that keeps a compressed span alive: a policy's compression copies what it stores.
"""

from __future__ import annotations

import dataclasses

import torch

GROWTH = 1.5  # capacity factor when a chunk does not fit the planned room (varying chunk sizes)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Full-precision K/V ``[B, H, n, D]`` whose first token has absolute position ``start``."""

    k: torch.Tensor
    v: torch.Tensor
    start: int

    @property
    def tokens(self) -> int:
        return self.k.shape[2]


def extent(chunks: list[Chunk]) -> int:
    """The tokens of ``chunks``, consecutive pieces of the token stream (a layer's tail: chunks
    appended in order, trimmed only at its two ends), from their positions alone: a decoding
    tail of thousands of one-token chunks is not walked at every step."""
    return chunks[-1].start + chunks[-1].tokens - chunks[0].start if chunks else 0


def adjacent(a: torch.Tensor, b: torch.Tensor, dim: int = 2) -> bool:
    """Whether ``b`` continues ``a`` along ``dim`` in the same storage (the tokens of [B, H, n, D]
    by default; along the batch, the values right after the keys in a tail buffer)."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.stride() == b.stride()
        and a.shape[:dim] + a.shape[dim + 1 :] == b.shape[:dim] + b.shape[dim + 1 :]
        and b.storage_offset() == a.storage_offset() + a.shape[dim] * a.stride(dim)
    )


def joined(parts: list[torch.Tensor], dim: int = 2) -> list[torch.Tensor]:
    """``parts`` in order, each run of views adjacent along ``dim`` replaced by one view."""
    out: list[torch.Tensor] = []
    for t in parts:
        if out and adjacent(out[-1], t, dim):
            a = out[-1]
            shape = list(a.shape)
            shape[dim] += t.shape[dim]
            out[-1] = a.as_strided(shape, a.stride(), a.storage_offset())
        else:
            out.append(t)
    return out


def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` along the batch, as a view where they lie back to back in one storage
    (the keys and values of a span in a tail buffer): nothing copied."""
    runs = joined(parts, dim=0)
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def joined_kv(chunks: list[Chunk]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`joined` of the chunks' keys and of their values."""
    return joined([c.k for c in chunks]), joined([c.v for c in chunks])


class TailBuffer:
    """The storage of one layer's tail (see the module docstring)."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        # the tail the last append laid out here, one run of views: (its number of chunks, its
        # first and last chunk, the offset after it); a tail of that length, first and last chunk
        # is that run (chunks are frozen and every change of a tail replaces its first or last),
        # so token-by-token decoding, a chunk an append, does not join the whole tail at every step
        self._run: tuple[int, Chunk, Chunk, int] | None = None
        self.last_chunk = 0  # the tokens of the last chunk appended

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of this buffer's keys or values."""
        ptr = t.untyped_storage().data_ptr()
        return self.k is not None and ptr in (self.k.untyped_storage().data_ptr(), self.v.untyped_storage().data_ptr())

    def is_run(self, tail: list[Chunk]) -> bool:
        """Whether ``tail`` is the run the last append laid out (or :meth:`follow` kept)."""
        run = self._run
        return bool(tail) and run is not None and run[0] == len(tail) and tail[0] is run[1] and tail[-1] is run[2]

    @property
    def end(self) -> int:
        """The offset right after the run (see :meth:`is_run`)."""
        return self._run[3]

    def put(self, run: list[Chunk], k: torch.Tensor, v: torch.Tensor, start: int, end: int | None = None) -> Chunk:
        """The chunk ``k``, ``v`` [B, H, n, D] (of this buffer's batch, heads, head dim, dtype and
        device) starting at position ``start``, copied as views right after ``run``, which ends at
        offset ``end`` (default: ``run`` is this buffer's run, :meth:`is_run`, :attr:`end`) with
        room for it; the run then ends with the chunk (once the caller appends it to ``run``,
        which this leaves alone)."""
        end, n = self._run[3] if end is None else end, k.shape[2]
        chunk = Chunk(self.k.narrow(2, end, n), self.v.narrow(2, end, n), start)
        chunk.k.copy_(k)
        chunk.v.copy_(v)
        self.last_chunk = n
        self._run = (len(run) + 1, run[0] if run else chunk, chunk, end + n)
        return chunk

    def prefix(self, tail: list[Chunk], n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``n`` tokens of ``tail`` as one view each of keys and values when ``tail`` is
        this buffer's run (found without walking its chunks), else None."""
        run = self.run(tail)
        if run is None:
            return None
        start = run[0]
        return self.k[:, :, start : start + n], self.v[:, :, start : start + n]

    def run(self, tail: list[Chunk]) -> tuple[int, int] | None:
        """(offset in the buffer, tokens) of ``tail`` when it is this buffer's run (found without
        walking it: the room after it is where the next appends go), else None."""
        if not self.is_run(tail):
            return None
        n = extent(tail)
        return self._run[3] - n, n

    def follow(self, tail: list[Chunk], rest: list[Chunk]) -> None:
        """Keep the run known when ``rest`` is what is left of the run ``tail`` after its first
        tokens were taken: whole chunks, or the last of them cut, its rest a view of this buffer
        that ends where the cut chunk did (a copy is no part of the run: then the next append
        finds the end anew)."""
        if not (self.is_run(tail) and rest and rest[-1] is tail[-1]):
            return
        first, cut = rest[0], tail[len(tail) - len(rest)]
        if first is cut or (first.start + first.tokens == cut.start + cut.tokens and self.holds(first.k)
                            and self.holds(first.v)):
            self._run = (len(rest), first, rest[-1], self._run[3])

    def _end(self, tail: list[Chunk]) -> int | None:
        """Offset right after ``tail`` when the whole tail is one run of views of this buffer (0
        for an empty tail), else None."""
        if not tail:
            return 0 if self.k is not None else None
        if self.is_run(tail):
            return self._run[3]
        ks, vs = joined_kv(tail)
        if len(ks) != 1 or len(vs) != 1 or not self.holds(ks[0]) or ks[0].stride() != self.k.stride():
            return None
        return ks[0].storage_offset() // self.k.stride(2) + ks[0].shape[2]

    def _fits(self, like: torch.Tensor) -> bool:
        k = self.k
        return k is not None and (k.shape[:2], k.shape[3], k.dtype, k.device) == (
            like.shape[:2], like.shape[3], like.dtype, like.device)

    def _place(self, tail: list[Chunk], tokens: int, planned: int, like: torch.Tensor,
               limit: int | None = None) -> list[Chunk]:
        """The tail copied to the front of the buffer (grown if it cannot also take ``tokens``
        more), as views; ``planned``: the capacity to grow to, ``limit``: the most it grows to
        while the tail and chunk fit in it (None: no bound; beyond it, by ``GROWTH``), ``like``: a
        chunk's tensor."""
        live = sum(c.tokens for c in tail)
        need = live + tokens
        old_k = torch.cat([c.k for c in tail], 2) if tail else None  # a copy: the tail may live here
        old_v = torch.cat([c.v for c in tail], 2) if tail else None
        if not self._fits(like) or need > self.capacity:
            cap = max(planned, int(GROWTH * self.capacity) if self._fits(like) else 0)
            if limit is not None:  # beyond the limit (a long chunk, a tail kept past it): room to grow
                cap = min(cap, limit if need <= limit else int(GROWTH * need))
            cap = max(need, cap)
            b, h, _, d = like.shape
            self.k = self.v = None  # free the old buffer first (its tail is copied above)
            # keys then values in one storage: a span's keys and values stacked along the batch
            # are one view of it (:func:`stacked`), which compression reads without a copy
            both = torch.empty(2 * b, h, cap, d, dtype=like.dtype, device=like.device)
            self.k, self.v = both[:b], both[b:]
        placed, at = [], 0
        if old_k is not None:
            self.k[:, :, :live].copy_(old_k)
            self.v[:, :, :live].copy_(old_v)
        for c in tail:
            placed.append(Chunk(self.k[:, :, at : at + c.tokens], self.v[:, :, at : at + c.tokens], c.start))
            at += c.tokens
        return placed

    def append(self, tail: list[Chunk], k: torch.Tensor, v: torch.Tensor, start: int, planned: int,
               limit: int | None = None) -> list[Chunk]:
        """``tail`` (its chunks possibly moved within the buffer, same values) and, last, the chunk
        ``k``, ``v`` [B, H, n, D] (copied into the buffer) starting at absolute position ``start``;
        ``planned`` and ``limit``: see :meth:`_place`."""
        n = k.shape[2]
        end = self._end(tail) if self._fits(k) else None
        if end is None or end + n > self.capacity:
            tail = self._place(tail, n, planned, k, limit)
            end = sum(c.tokens for c in tail)
        return [*tail, self.put(tail, k, v, start, end)]

    def moved(self, tail: list[Chunk], capacity: int) -> list[Chunk]:
        """``tail`` (views of this buffer, or not) copied to the front of new storage of
        ``capacity`` tokens (at least the tail's), which replaces this buffer's; the old storage
        is freed once nothing else views it."""
        self.k = self.v = self._run = None
        return self._place(tail, 0, capacity, tail[0].k) if tail else tail

    def stage(self, tail: list[Chunk], k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(keys, values) of ``tail`` followed by ``k``, ``v`` as one view each, ``k``/``v`` written
        into the free room after the tail (which holds no token: the tail is unchanged); None when
        the tail is not one run of this buffer or the room is too small."""
        end = self._end(tail) if self._fits(k) else None
        n = k.shape[2]
        if end is None or end + n > self.capacity:
            return None
        self.k[:, :, end : end + n].copy_(k)
        self.v[:, :, end : end + n].copy_(v)
        start = end - sum(c.tokens for c in tail)
        return self.k[:, :, start : end + n], self.v[:, :, start : end + n]
