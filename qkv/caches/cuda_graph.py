"""A call captured in a CUDA graph, as the cache's replayed encodes and attends make them."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_graph(fn: Callable[[], object], pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run ``fn`` once on a side stream (compiles its kernels, settles the allocator), then
    capture it in a CUDA graph on that stream, its memory from ``pool`` (a graph's ``pool()``
    that is still alive; None: a pool of its own): (the graph, the captured call's output, whose
    memory each replay writes). Unlike ``torch.cuda.graph``, it neither waits for the device nor
    empties the allocator's cache (a decoding step that captures would then allocate every later
    activation from the driver again)."""
    main, side = torch.cuda.current_stream(), torch.cuda.Stream()
    side.wait_stream(main)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        fn()
        if pool is None:
            graph.capture_begin()
        else:
            graph.capture_begin(pool=pool)
        try:
            out = fn()
        finally:
            graph.capture_end()
    main.wait_stream(side)
    return graph, out
