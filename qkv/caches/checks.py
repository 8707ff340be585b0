"""A layer's value checks (``validate``): every appended chunk finite and within range.

Off a GPU a chunk is checked before it is stored, and a bad one is refused with the layer
unchanged (:func:`qkv.validation.check_kv_values_later` raises). On a GPU reading a verdict back
would make the host wait for the device, so a check is queued (:class:`PendingCheck`) and its
verdict looked at later (:meth:`ValueChecks.settle`): a bad chunk is stored, the first call after
its verdict arrives raises, and the layer refuses every call until it is reset. Chunks the tail
takes whole are checked together, :data:`CHECK_BATCH` tokens at a time (token-by-token decoding:
one check every 256 steps instead of every step); the layer flushes the tokens still waiting
(:meth:`ValueChecks.flush`) before any of them is compressed, evicted, dropped, reordered or leaves
it, and :meth:`ValueChecks.settle` flushes them before it waits.
"""

from __future__ import annotations

import torch

from qkv import validation
from qkv.caches.tail import Chunk, TailBuffer, extent, joined_kv
from qkv.errors import QKVError
from qkv.validation import PendingCheck, check_kv_values_later

__all__ = ["CHECK_BATCH", "Pending", "ValueChecks"]

# tail tokens whose check waits for more, at most (on a GPU): a check costs a decoding step's host
# a few launches, a pinned buffer and an event per layer; every 32 tokens that was 1.6% of a
# Llama-3-8B-shaped step on an H100 (qvg 1.018x DynamicCache's step, without checks 1.001x:
# benchmarks/results/bench_decode_unchecked_h100.json)
CHECK_BATCH = 256
# a check on its way: the check, the indices of the chunk's tensors in it, the chunk's tokens
Pending = tuple[PendingCheck, tuple[int, ...], str]


class ValueChecks:
    """The value checks of the layer named ``name`` ("layer 3"): ``pending``, queued and not yet
    looked at; ``unchecked``, the newest tail tokens whose check waits for :data:`CHECK_BATCH`;
    ``refused``, the error of a failed one, raised by every :meth:`settle` from then on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[Pending] = []
        self.unchecked = 0
        self.refused: QKVError | None = None

    def chunk(self, k: torch.Tensor, v: torch.Tensor, start: int, ahead: tuple | None) -> list[Pending]:
        """The check of a chunk about to be stored as tokens ``start`` on: done now, raising, off a
        GPU; on a GPU on its way (or ``ahead``, the (check, indices) that
        :meth:`KVCache.compress_ahead` made for it), returned for the caller to add to
        ``pending`` once the chunk is stored."""
        where = f"tokens {start}..{start + k.shape[2] - 1}"
        if ahead is not None:
            return [(*ahead, where)]
        check = check_kv_values_later(f"{self.name}: k", k, (f"{self.name}: v", v))
        return [(check, (0, 1), where)] if check is not None else []

    @staticmethod
    def batches(k: torch.Tensor) -> bool:
        """Whether the check of a chunk ``k`` that the tail takes whole may wait for more tokens: on
        a GPU (:func:`qkv.validation.deferred`), not while a CUDA graph is captured (where a check
        is refused: :meth:`chunk` says so)."""
        return validation.deferred(k) and not (k.is_cuda and torch.cuda.is_current_stream_capturing())

    def mark(self) -> tuple[int, int]:
        """What :meth:`restore` returns to: an append that fails leaves no check of its chunk."""
        return self.unchecked, len(self.pending)

    def restore(self, mark: tuple[int, int]) -> None:
        self.unchecked = mark[0]
        del self.pending[mark[1]:]

    def flush_if_full(self, tail: list[Chunk], buffer: TailBuffer) -> None:
        """:meth:`flush` once :data:`CHECK_BATCH` tokens wait (after an append)."""
        if self.unchecked >= CHECK_BATCH:
            self.flush(tail, buffer)

    def flush(self, tail: list[Chunk], buffer: TailBuffer) -> None:
        """Queue the check of the ``unchecked`` newest tokens of ``tail`` (the layer's tail, or the
        list about to become it), one reduction per run of adjacent chunks: one view of ``buffer``
        (the layer's tail buffer) when ``tail`` is its run, without walking the chunks."""
        n = self.unchecked
        if not n:
            return
        if buffer.is_run(tail) and n <= extent(tail):
            self.unchecked, end = 0, tail[-1].start + tail[-1].tokens
            self._queue([buffer.k[:, :, buffer.end - n : buffer.end]], [buffer.v[:, :, buffer.end - n : buffer.end]],
                        f"tokens {end - n}..{end - 1}")
            return
        newest, have = [], 0
        for c in reversed(tail):
            if have >= n:
                break
            newest.append(c)
            have += c.tokens
        newest.reverse()
        self.unchecked, n = 0, min(n, have)
        if not n:
            return
        if have > n:
            first, cut = newest[0], have - n
            newest[0] = Chunk(first.k[:, :, cut:], first.v[:, :, cut:], first.start + cut)
        end = newest[-1].start + newest[-1].tokens
        self._queue(*joined_kv(newest), f"tokens {end - n}..{end - 1}")

    def _queue(self, ks: list[torch.Tensor], vs: list[torch.Tensor], where: str) -> None:
        """Queue the check of keys ``ks`` and values ``vs``, the layer's tokens ``where``."""
        named = [(f"{self.name}: k", t) for t in ks] + [(f"{self.name}: v", t) for t in vs]
        check = check_kv_values_later(*named[0], *named[1:])
        if check is not None:
            self.pending.append((check, tuple(range(len(named))), where))

    def settle(self, tail: list[Chunk], buffer: TailBuffer, wait: bool = True) -> None:
        """Raise the error of a chunk whose check failed and keep raising it (``refused``).
        ``wait``: check the tokens of ``tail`` (in ``buffer``) still waiting and wait for every
        verdict (False: look at those that have arrived)."""
        if self.refused is not None:
            raise self.refused
        if wait:
            self.flush(tail, buffer)
        while self.pending and (wait or self.pending[0][0].ready()):
            check, indices, where = self.pending.pop(0)
            error = check.error(indices)
            if error is not None:
                self.refused = type(error)(
                    f"{error}, appended as {where}: found on the GPU after the append returned, with the "
                    "chunk stored; the layer refuses every call until reset()")
                raise self.refused
