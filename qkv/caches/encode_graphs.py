"""Span encodes replayed from CUDA graphs: ``KVCache(..., encode_graphs=True)``.

A streaming cache compresses spans of one shape again and again: a k-means policy seeds each with
the previous span's centroids, so every encode queues the same ~60 launches; a policy without
k-means (rtn, kivi, quarot) queues the same launches for every group of tokens it compresses
(KIVI: one every 32 tokens of a decoding step). :class:`EncodeGraphs` captures the encode of each
(tensor policy, input shape and dtype, warm-start shape) once in a CUDA graph, after one eager
warm-up call on a side stream, and from then on replays it: the input, the warm-start centroids
(and the value check's row peaks, if it read them) are copied into the graph's own buffers, the
graph replays, and the compressed fields are copied out (the next replay overwrites the graph's;
a K and V compressed in one pass are split into copies anyway, so that split is the copy). So an
encode costs the host a few launches instead of its ~60.

What a user gives up for it:

- k-means runs all its iterations: a replay cannot stop early on a flag it would first read from
  the GPU (an eager encode stops once every row converged), so a graphed span may differ from an
  eager one by those extra iterations;
- each captured shape keeps the encode's working memory (the graph's pool) for the cache's life.

Encodes whose grouping would draw random numbers (a k-means cold start: seeding) and inputs off a
CUDA device are encoded eagerly. Every other encode makes no host sync and draws nothing
(qkv.grouping, qkv.validation), which is what lets it be captured; one that cannot be raises
:class:`BackendError` naming the shape instead of running eagerly unnoticed.
"""

from __future__ import annotations

import torch

from qkv.caches.cuda_graph import cuda_graph
from qkv.compressed import CompressedTensor
from qkv.errors import BackendError


class EncodeGraphs:
    """The captured encodes of one cache, by shape. ``capture(call, pool)``: how a graph is made
    (:func:`~qkv.caches.cuda_graph.cuda_graph`: a graph with ``replay()``, and the call's output;
    each shape's graph in a pool of its own); ``devices``: the device types whose encodes are
    captured."""

    def __init__(self, capture=cuda_graph, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.capture, self.devices = capture, devices
        self._graphs: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def encode(self, policy, x: torch.Tensor, warm: list[torch.Tensor] | None, backend: str,
               peaks: torch.Tensor | None, *, copy: bool = True) -> CompressedTensor:
        """``policy._compress(x, warm, backend, peaks)`` (a :class:`~qkv.caches.policy.TensorPolicy`),
        replayed from its graph when ``x`` is on one of :attr:`devices` and the encode draws
        nothing (warm-started, or a grouping that draws nothing cold); eagerly otherwise.
        ``peaks`` (the value check's row peaks, or None) are an input too. ``copy``: return a copy
        of a replay's output; False for a caller that copies what it keeps before the next encode
        (the graph's own tensors, overwritten by its next replay)."""
        if (warm is None and policy.grouping.draws_cold) or x.device.type not in self.devices:
            return policy._compress(x, warm, backend, peaks)
        inputs = [x, *(warm or ())] + ([] if peaks is None else [peaks])
        key = (policy, backend, None if warm is None else len(warm), peaks is None,
               *((tuple(t.shape), t.dtype, t.device) for t in inputs))
        graph = self._graphs.get(key)
        if graph is None:
            static = [t.clone(memory_format=torch.contiguous_format) for t in inputs]
            static_x, static_warm = static[0], None if warm is None else static[1 : 1 + len(warm)]
            static_peaks = None if peaks is None else static[-1]
            try:
                graph, out = self.capture(lambda: policy._compress(static_x, static_warm, backend, static_peaks), None)
                replay = graph.replay
            except RuntimeError as e:
                raise BackendError(
                    f"encode_graphs: the encode of {list(x.shape)} {x.dtype} could not be captured in a "
                    f"CUDA graph ({e}); make the cache without encode_graphs"
                ) from e
            self._graphs[key] = static, replay, out
        else:
            static, replay, out = graph
            for dst, src in zip(static, inputs):
                dst.copy_(src)
        replay()  # a capture records the encode without running it
        return out.mapped(torch.clone) if copy else out
