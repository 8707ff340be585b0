"""Running a test body on several gloo ranks: fresh processes, a free TCP port, and a deadline.

``run_ranks(fn, world, *args)`` calls ``fn(rank, world, *args)`` in ``world`` new processes once
the gloo process group is up (one intra-op thread each: the machines the tests run on have few
cores). The processes are forked from a forkserver that imported torch, qkv and the model code
the tests run once per test run (:data:`PRELOAD`; importing them takes seconds, the tests
themselves a fraction of that); the forkserver is a fresh interpreter that ran nothing, so
forking it is safe. A rank that raises fails the test with its traceback; ranks still
running at the deadline (a hung collective, a rank waiting for one that died) are killed and the
test fails, instead of hanging the run. Collectives also time out on their own
(``COLLECTIVE_TIMEOUT``), so a rank left alone raises rather than waits.
"""

from __future__ import annotations

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = 30  # seconds a gloo collective waits for the other ranks
PRELOAD = ["torch", "torch.distributed", "qkv", "qkv.caches.adapters.wan",
           "diffusers.models.transformers.transformer_wan", "models.wan.causal_model"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, init: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    fn(rank, world, *args)
    dist.barrier()  # no rank leaves (rank 0 takes the store down with it) while another still sets up groups
    dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` (a module-level function) on ``world`` gloo ranks; fail
    the test if a rank raises or the ranks are not all done within ``timeout`` seconds."""
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # no effect once the server runs
    context = mp.start_processes(_entry, args=(fn, world, init, args), nprocs=world, join=False,
                                 start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
            pytest.fail(f"{world} gloo ranks did not finish within {timeout:.0f} s")
