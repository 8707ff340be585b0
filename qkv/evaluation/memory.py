"""Keep freed memory inside the process, so the evaluation does not fault it in again and again.

The evaluation compresses the same large spans with policy after policy; every call allocates and
frees temporaries of tens of MB. With glibc's defaults those go back to the operating system as
soon as they are freed (blocks above the mmap threshold are unmapped; a free heap top above the
trim threshold is trimmed), so the next call faults every page in again, zeroed by the kernel:
the full evaluation at a1162fe spent more time in the kernel than in torch (sys 1964 s vs user
1748 s, 686 M minor page faults; docs/eval.md, "Cost"). ``mallopt`` is glibc's interface for
exactly this.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve every block from the heap (no per-block mmap) and never trim it, for the rest of the
    process. Peak memory stays that of the largest working set; page faults happen once.
    Returns False (and changes nothing) where the C library is not glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
