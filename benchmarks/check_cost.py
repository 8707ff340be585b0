"""Host time of the pieces of a value check on a GPU (``qkv.validation.PendingCheck``): a tiny
launch for scale, the two max-|x| reductions and their stack, a pinned buffer, the copy behind an
event (``qkv.readback.Arriving``), a whole queued check, and one whose verdict is read after a
sync. A decoding step's tail check covers one layer's newest tokens: [1, 8, 32, 128] bf16 K and V.

Each row is the host's time per call (``launch_cost.per_call``: the mean of 2,000, 500 for the
read verdict, after 50 warm-up calls).

    PYTHONPATH=.:benchmarks python3 benchmarks/check_cost.py
"""

from __future__ import annotations

import torch
from launch_cost import per_call

from qkv.readback import Arriving
from qkv.validation import PendingCheck


def per_call_us(name: str, fn, n: int = 2000) -> None:
    print(f"{name}: {per_call(fn, n):.1f} us", flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    k = torch.randn(1, 8, 32, 128, device="cuda").bfloat16()
    v = torch.randn_like(k)
    peaks = torch.zeros(2, device="cuda")
    per_call_us("tiny launch", lambda: k.add_(0))
    per_call_us("two max-|x| reductions + stack", lambda: torch.stack(
        [torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32) for t in (k, v)]))
    per_call_us("pinned buffer", lambda: torch.empty((2,), pin_memory=True))
    per_call_us("Arriving (pinned buffer, copy, event)", lambda: Arriving(peaks))
    per_call_us("event + record", lambda: torch.cuda.Event().record())

    def queued():
        check = PendingCheck([("k", k), ("v", v)])
        check.ready()

    def read():
        check = PendingCheck([("k", k), ("v", v)])
        torch.cuda.synchronize()
        check.error((0, 1))

    per_call_us("PendingCheck queued + ready()", queued)
    per_call_us("PendingCheck + its verdict after a sync", read, 500)


if __name__ == "__main__":
    main()
