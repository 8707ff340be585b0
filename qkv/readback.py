"""Small device values read back to the host without making it wait for the GPU.

``tensor.tolist()`` on a GPU waits until every queued kernel has run: the host stops launching
and the GPU then idles while it starts again. :class:`Arriving` copies a small tensor to pinned
host memory behind an event instead; the host asks whether it has arrived (never waiting) and
reads it once it has, or waits for it only when it must have the value now.
"""

from __future__ import annotations

import torch


class Arriving:
    """The values the small tensor ``t`` holds now, on their way to the host: copied behind an
    event on a GPU, at hand at once elsewhere (a copy either way: later writes to ``t`` do not
    reach them)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._event = None
        if not t.is_cuda:
            self._host = t.detach().clone()
            return
        self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self._host.copy_(t, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(t.device))  # the copy's stream, on its device

    def ready(self) -> bool:
        """Whether the values have arrived (never waits; while a CUDA graph is being captured,
        where an event may not be queried, they have not)."""
        if self._event is None:
            return True
        if torch.cuda.is_current_stream_capturing() or not self._event.query():
            return False
        self._event = None
        return True

    def values(self):
        """The values (``tolist()``: a number for a 0-d tensor), waiting for them if they have not arrived."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host.tolist()
