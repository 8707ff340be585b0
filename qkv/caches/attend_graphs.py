"""Few-query attention replayed from a CUDA graph: ``KVCache(..., attend_graphs=True)``.

Token-by-token decoding appends a token to every layer and attends to the layer's history with
one query a head, hundreds of times over the same spans: between two span compressions only the
tail grows. The decode path's host work (the segments, the launch constants, three launches)
then costs more than the GPU's time at batch 1 (docs/attention.md, ``generate``). So a layer's
:class:`AttendGraph` captures that call once the same history has been attended to twice in a
row: the sink, the span plan, and the tail as its buffer's room from the tail's first token on,
of which the device holds the count of live keys (``live``, see :func:`qkv.kernels.attention`; the
room up to twice the tail's tokens at the capture, and at least :data:`ROOM` more).
Each replay adds one to that count first (a decoding step appends one token between two calls);
where the host's count says the device's is off (another number of tokens appended, a ``crop``),
it writes the count before the replay. The query is read where it lies where a query of the last
two calls lay (a model's allocations repeat from step to step, or cycle over two steps, so each
layer's query takes one address or two): the call there captures a graph that reads it in place
(at most :data:`IN_PLACE` a history), which every call at that address replays, so a call costs
the host one replay. A query elsewhere is copied into another graph's own query first (a copy a
call: ~13 us of the host's time on an H100, a tenth of a layer's decoding step,
``benchmarks/results/profile_generate_qvg_host_split_h100.txt``); before any graph reads it in
place, only from the second such call in a row (the first runs eagerly).

A new span, a tail moved within or out of its buffer or grown past the room read, another query
shape or scale: the history is no longer the captured one, the graph goes, the call runs eagerly,
and the next such call captures again. Calls that would not run the decode kernel (more queries,
``extra`` keys, a backend or layout it cannot take) run eagerly, and a capture that fails leaves
its reason in :attr:`AttendGraph.refused`. Each graph keeps its call's partials (at most
``PARTIAL_SHARE`` of the bytes it reads) and output: the output is the graph's own, which its
next replay overwrites. A history's graphs (in place, copied) come from one pool (never
replayed at once: one stream, one call at a time) and read one count of live keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qkv import kernels
from qkv.caches.cuda_graph import cuda_graph
from qkv.kernels.attention import attention_decode_torch

# A graph reads the tail's room up to twice the tail's tokens when it is captured, and at least this
# many more (its launch is sized for them: a room far larger than the tail would split the spans'
# work among fewer programs); a tail that outgrows it is captured again
ROOM = 64
# A history's graphs that read the query in place, at most: one for each address the query takes
# (a model's allocations repeat from step to step, or cycle over two)
IN_PLACE = 2


class AttendGraph:
    """The captured attend of one layer (see the module docstring). ``capture(call, pool)``: how a
    graph is made (:func:`~qkv.caches.cuda_graph.cuda_graph`: a graph with ``replay()`` and
    ``pool()``, and the call's output); ``devices``: the device types whose calls are captured.
    Each capture takes its memory from the pool of the graph it replaces, which is still alive
    then: a layer that captures again at every new span holds one graph's memory, not one pool
    per capture waiting to be freed."""

    def __init__(self, capture=cuda_graph, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.capture, self.devices = capture, devices
        self.captures = 0  # graphs made so far
        self.refused: str | None = None  # why the last capture failed (the call then ran eagerly)
        self.replays = {"in place": 0, "copied": 0}  # replays so far, by where the query was read
        self._last = None  # the last graph made: its pool serves the next capture
        self._drop()

    def _drop(self) -> None:
        self._key: tuple | None = None
        self._room = 0  # the tail tokens the graphs read at most
        self._held: tuple = ()  # what the key names by id, kept alive so that no id is reused
        self._in_place: dict[int, tuple] = {}  # query address -> (graph, out), () where capture failed
        self._copied: tuple | None = None  # (graph, its own query, out), () where capture failed
        self._count: torch.Tensor | None = None  # the device's live count, which every graph reads
        self._live: int | None = None  # the device's live count as the host knows it (None: unknown)
        self._recent: tuple[int, ...] = ()  # where the last two calls' queries lay, the last first
        self._misses = 0  # calls in a row not replayed in place

    def attend(self, layer, q: torch.Tensor, scale: float | None, eager: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``layer``'s attention of ``q`` to its history, replayed where it can be, else ``eager()``."""
        if q.is_cuda and torch.cuda.is_current_stream_capturing():  # the caller's own graph records the call
            return eager()
        buf = layer.buffer
        run = buf.run(layer.tail) if q.device.type in self.devices else None
        if run is None or kernels.choose_method(q, layer.config.attention) is not kernels.Method.DECODE:
            self._drop()
            return eager()
        start, tokens = run
        plan = layer.span_plan()
        key = (id(plan), id(buf.k), start, *map(id, layer.sink), q.shape, q.stride(), q.dtype, q.device, scale)
        if key != self._key or tokens > self._room:  # another history: eager, captured if it comes again
            self._drop()
            self._key, self._held = key, (plan, buf.k, tuple(layer.sink))
            self._room = min(buf.capacity - start, max(2 * tokens, tokens + ROOM))
            self._recent = (q.data_ptr(),)
            return eager()
        address, recent = q.data_ptr(), self._recent
        self._recent = (address, *recent[:1])
        graphs = self._in_place
        if address not in graphs and address in recent and len(graphs) < IN_PLACE:  # a query where one lay
            graphs[address] = self._make(layer, start, q, scale, tokens, in_place=True)
        if graphs.get(address):
            graph, out = graphs[address]
            self._misses = 0
            self.replays["in place"] += 1
        else:
            # before a graph reads it in place, a query elsewhere runs eagerly once (a history's
            # first calls move it: their outputs come from the model's memory, a graph's from its
            # own), then is copied into a graph's own query; once a graph reads it in place, at once
            self._misses += 1
            if self._copied is None and (graphs or self._misses >= 2):
                self._copied = self._make(layer, start, q, scale, tokens, in_place=False)
            if not self._copied:
                return eager()
            graph, static_q, out = self._copied
            static_q.copy_(q)
            self.replays["copied"] += 1
        if self._live != tokens - 1:
            self._count.fill_(tokens - 1)
        graph.replay()  # adds the step's token to the count, then attends
        self._live = tokens
        return out

    def _make(self, layer, start: int, q, scale, tokens, in_place: bool) -> tuple:
        """Capture the call, reading ``q`` where it lies (``in_place``) or a copy of it (an empty
        tuple, with :attr:`refused` set, where it cannot be)."""
        cfg, (plan, buf_k, sink) = layer.config, self._held
        end = start + self._room
        room = kernels.DenseKV(buf_k[:, :, start:end], layer.buffer.v[:, :, start:end])
        segments = [kernels.DenseKV(c.k, c.v) for c in sink] + [plan, room]
        query = q if in_place else q.clone()
        if self._count is None:
            self._count = torch.full((1,), tokens - 1, dtype=torch.int32, device=q.device)
        else:  # another graph's count: the capture's warm-up call adds this step's token to it
            self._count.fill_(tokens - 1)
        live = self._count

        def call() -> torch.Tensor:
            live.add_(1)
            return kernels.attention(query, segments, scale=scale, backend=cfg.backend, method=cfg.attention,
                                     live=live)

        if q.device.type == "cuda" and kernels.resolve("attention_decode", cfg.backend, q.device, query, segments,
                                                        scale, live) is attention_decode_torch:
            self.refused = "the decode kernel cannot read this history (its twin reads the count back)"
            return ()
        try:
            graph, out = self.capture(call, None if self._last is None else self._last.pool())
        except RuntimeError as e:
            self.refused = f"{type(e).__name__}: {e}"
            return ()
        self.captures += 1
        self._last = graph
        self._live = None  # the capture's warm-up call counted too
        # an in-place graph keeps the query's address (its key), not the query: held, its memory
        # could not take the next step's query
        return (graph, out) if in_place else (graph, query, out)
