"""Where a decoding step's time goes with ``QKVCache(direct=True)``: host (cProfile) and GPU (torch.profiler).

``bench_decode.py``'s Llama-3-8B-shaped model (random bf16 weights, 8 of its 32 layers, as its
``generate``), a 32k-token prompt in one forward, then one-token forwards: the time of 16 of them,
cProfile over 16 more (cumulative, top 40), the operations that make the host wait for the GPU
in 8 more (``torch.cuda.set_sync_debug_mode``, counted by the line that called them), and
torch.profiler tables over 8 more (by GPU time and by host time). ``generate`` itself is timed for
1 and 33 new tokens after a 40-token warm-up. Last, :func:`host_split` over 64 more: the host's
microseconds a layer in the cache's ``update`` and in the attention function, timed around each
call without a profiler (the two places where the caches' steps differ), and for qkv where its
attend graphs read the query (in place or copied).

    PYTHONPATH=. python3 benchmarks/profile_generate.py qvg > benchmarks/results/profile_generate_qvg_h200.txt
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time
import warnings
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from bench_decode import GENERATE_SPAN, llama
from common import environment

from qkv.caches.adapters.transformers_cache import ATTENTION, QKVCache

PROMPT = 32 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", help="a preset (in spans of bench_decode's generate rows), or 'dynamic' for "
                        "transformers' DynamicCache with its default attention (the baseline)")
    args = parser.parse_args()
    print(json.dumps(environment()), flush=True)
    model = llama(8)
    model.set_attn_implementation("sdpa" if args.policy == "dynamic" else ATTENTION)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), device="cuda")

    def make():
        if args.policy == "dynamic":
            return DynamicCache()
        return QKVCache(args.policy, span_tokens=GENERATE_SPAN, direct=True)

    def step(cache, i):
        model(prompt[:, -1:], past_key_values=cache, use_cache=True,
              position_ids=torch.tensor([[PROMPT + i]], device="cuda"))

    with torch.no_grad():
        model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, past_key_values=make())
        for n in (1, 33):
            torch.cuda.synchronize()
            start = time.time()
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=make())
            torch.cuda.synchronize()
            print(n, "tokens", time.time() - start, flush=True)
        cache = make()
        model(prompt, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        start = time.time()
        for i in range(16):
            step(cache, i)
        torch.cuda.synchronize()
        print("16 bare forwards", time.time() - start, flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for i in range(16, 32):
            step(cache, i)
        torch.cuda.synchronize()
        prof.disable()
        pstats.Stats(prof).strip_dirs().sort_stats("cumulative").print_stats(40)  # no paths of this machine
        # every operation that makes the host wait for the GPU, by where it was called from
        syncs = Counter()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(40, 48):
                step(cache, i)
        torch.cuda.set_sync_debug_mode(0)
        for w in caught:
            if "synchroniz" in str(w.message):
                syncs[f"{os.path.basename(w.filename)}:{w.lineno}: {w.message}"] += 1
        print("host syncs in 8 steps:", sum(syncs.values()))
        for where, n in syncs.most_common(10):
            print(f"  {n} x {where}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
            for i in range(48, 56):
                step(cache, i)
            torch.cuda.synchronize()
    print(tprof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    print(tprof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    with torch.no_grad():
        split = host_split(model, cache, lambda: [step(cache, i) for i in range(56, 120)])
    print("host us a layer, mean of 64 steps:", ", ".join(f"{name} {us:.1f}" for name, us in split.items()))
    if args.policy != "dynamic":  # where the attend graphs read the query (qkv.caches.attend_graphs)
        graphs = [layer.layer.attend_graph for layer in cache.layers]
        print("attend graphs:", sum(g.captures for g in graphs), "captures, replays",
              {kind: sum(g.replays[kind] for g in graphs) for kind in graphs[0].replays})


def host_split(model, cache, run) -> dict[str, float]:
    """The host's mean microseconds per call of ``cache.update`` and of the model's attention
    function (one each per layer and step) while ``run()`` runs, each timed by ``perf_counter``
    around the call (no profiler, no device sync), and the rest of the steps' wall time per layer."""
    spent, calls = Counter(), Counter()

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - start
            calls[name] += 1
            return out
        return call

    impl = model.config._attn_implementation
    ALL_ATTENTION_FUNCTIONS[impl] = timed("attention", ALL_ATTENTION_FUNCTIONS[impl])
    cache.update = timed("update", cache.update)
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        del ALL_ATTENTION_FUNCTIONS[impl], cache.update
    split = {name: 1e6 * spent[name] / calls[name] for name in ("update", "attention")}
    split["rest of the step"] = 1e6 * (total - spent["update"] - spent["attention"]) / calls["update"]
    return split


if __name__ == "__main__":
    main()
