"""Host time of a token-by-token decoding step through transformers, on the CPU: qkv's caches
against ``DynamicCache``, with the attention kernels' own work taken out.

``generate`` with a small batch is host-bound on a GPU (docs/attention.md): a step costs what
Python and the launches cost, layer by layer, and the GPU waits. This measures that cost where no
GPU is needed, so that a change to the per-step path can be judged on any machine: a
Llama-shaped model of ``--layers`` layers with Llama-3-8B's head size (4 query heads and 1 KV head
of 128, hidden 512: its matmuls cost little on a CPU), random bf16 weights, a ``--prompt``-token
prompt, then ``--steps`` one-token forwards with every cache taking turns at each step (a host
that speeds up or slows down weighs on all alike), each step timed on its own; the median.

Also the torch operators of one more step, counted with a dispatch mode, beyond ``dynamic``'s
(on a GPU each is a launch or a view). Caches:

- ``dynamic``: transformers' ``DynamicCache`` and SDPA;
- ``kivi``, ``qvg``, ``rtn``: ``QKVCache(policy, direct=True, attend_graphs=False)`` with ``attn_implementation="qkv"``
  (qvg and rtn with 4,096-token spans, as ``bench_decode.py``; KIVI compresses a group every 32
  tokens), value checks batched as on a GPU;
- ``kivi_graphs``, ``qvg_graphs``: the same with ``attend_graphs=True`` (``direct=True``'s default), each layer's graph
  "replayed" by a call that does nothing (what is left is the host's side of a replayed step: the
  append, the query copy and the checks that the history is the captured one).

Taken out, so that what is left is host work: the attention itself (torch's SDPA returns zeros
for ``dynamic``; the decode and merge kernels' launches are recorded, not run, and the merge's
output is zeroed: Triton has no CPU driver), on both sides alike. Not taken out: everything
else, the caches' Python, their torch ops (on a GPU each a launch), KIVI's group compression
(on the CPU the torch twin's work). A launch through Triton costs more than a recorded call
(``launch_cost.py``: ~35 us on an H200's host, two a layer), which this does not show.

    PYTHONPATH=. python3 benchmarks/host_step.py --out benchmarks/results/host_step_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import time
import warnings
from unittest import mock

import torch
from bench_append import CountOps, Recorded
from common import environment, write_json

import qkv
from qkv import validation
from qkv.caches import layer_cache
from qkv.caches.attend_graphs import AttendGraph
from qkv.kernels.triton import decode

SPAN = 4096


class IdleGraph:
    """A graph whose replay does nothing (a CUDA graph's replay is one call for the host)."""

    def replay(self) -> None:
        pass

    def pool(self) -> None:
        return None


def idle_capture(call, pool):
    return IdleGraph(), call()


class ZeroedMerge(Recorded):
    """The merge kernel, recorded, its output zeroed (the next layer then reads finite values)."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counts[self.name] += 1
            args[1].zero_()

        return launch


def model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=128, vocab_size=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def attention_on_triton(q, segments, *, scale=None, backend="auto", method="auto", live=None,
                        _attention=qkv.kernels.attention):
    """:func:`qkv.kernels.attention` on the Triton path a GPU takes (its kernels recorded)."""
    return _attention(q, segments, scale=scale, backend="triton", method=method, live=live)


def steps(layers: int, prompt_tokens: int, n: int) -> tuple[list[dict], dict]:
    from transformers import DynamicCache

    from qkv.caches.adapters.transformers_cache import ATTENTION, QKVCache

    llama = model(layers)
    makers = {
        "dynamic": DynamicCache,
        "kivi": lambda: QKVCache("kivi", direct=True, attend_graphs=False),
        "qvg": lambda: QKVCache(qkv.build_policy("qvg", clusters=16), span_tokens=SPAN, direct=True, attend_graphs=False),
        "rtn": lambda: QKVCache("rtn", span_tokens=SPAN, direct=True, attend_graphs=False),
        "kivi_graphs": lambda: QKVCache("kivi", direct=True),
        "qvg_graphs": lambda: QKVCache(qkv.build_policy("qvg", clusters=16), span_tokens=SPAN, direct=True),
    }
    prompt = torch.randint(0, 256, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(prompt_tokens, prompt_tokens + n)[None]
    # qkv's attention for every cache: it hands DynamicCache's steps to transformers' SDPA as "sdpa" does
    llama.set_attn_implementation(ATTENTION)
    caches = {name: make() for name, make in makers.items()}
    times = {name: [] for name in caches}
    with torch.no_grad():
        for cache in caches.values():
            llama(prompt, past_key_values=cache, use_cache=True)
        for i in range(n):
            order = list(caches)[i % len(caches):] + list(caches)[: i % len(caches)]
            for name in order:
                start = time.perf_counter()
                llama(prompt[:, -1:], past_key_values=caches[name], use_cache=True, position_ids=positions[:, i : i + 1])
                times[name].append((time.perf_counter() - start) * 1e3)
        ops = {}
        for name, cache in caches.items():  # one more step each, its torch operators counted
            counted = CountOps()
            with counted:
                llama(prompt[:, -1:], past_key_values=cache, use_cache=True, position_ids=positions[:, -1:] + 1)
            ops[name] = counted.count
    base = statistics.median(times["dynamic"])
    rows = []
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=10)
        median = statistics.median(ms)
        rows.append({"cache": name, "step_ms_median": median, "step_ms_p10": q[0], "step_ms_p90": q[-1],
                     "us_per_layer_over_dynamic": (median - base) * 1e3 / layers,
                     "torch_ops_per_layer_over_dynamic": (ops[name] - ops["dynamic"]) / layers})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    launches = collections.Counter()
    warnings.filterwarnings("ignore", message=".*past_key_values.*")
    with mock.patch.multiple(decode, decode_kernel=Recorded("decode", launches), merge_kernel=ZeroedMerge("merge", launches)), \
            mock.patch.object(validation, "deferred", lambda t: True), \
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, v, **kw: torch.zeros_like(q)), \
            mock.patch.object(qkv.kernels, "attention", attention_on_triton), \
            mock.patch.object(layer_cache, "AttendGraph", functools.partial(AttendGraph, idle_capture, ("cpu",))):
        rows = steps(args.layers, args.prompt, args.steps)
    write_json(args.out, {"environment": {**environment(), "device": "cpu", "threads": torch.get_num_threads()},
                          "layers": args.layers, "prompt": args.prompt, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
