"""LLM decoding over the compressed cache vs a bf16 cache, at Llama-3-8B attention shapes, on one GPU.

One attention layer: 32 query heads, 8 KV heads, head dim 128; the history is built by appending
spans of 4,096 tokens (each compressed once) plus a 1,000-token full-precision tail; cases: batch
1 at 32k and 128k history, batch 8 at 32k; 1 and 16 queries per head. For each policy (qvg, kivi,
rtn, quarot, and bf16 spans read through the same kernel) it measures ``KVCache.attend`` with the
default (``attention="auto"``: the decode kernel for these query counts) against
``scaled_dot_product_attention(enable_gqa=True)`` over the same tokens held as one bf16 tensor:

- ``ms``: median time of a call issued from Python (CUDA events around 50 back-to-back calls);
- ``graph_ms``: the same call replayed from a CUDA graph (no host work: the GPU's own time, as a
  decoder captured in a graph sees it), for both;
- ``peak_extra``: ``max_memory_allocated`` during the call minus what was allocated before it,
  next to the compressed cache's bytes (the spans; the tail is full precision in both);
- floors: bytes read (compressed spans + tail + queries) over the measured copy bandwidth, and
  the FLOPs (4 B H S_q S D) over the dense bf16 matmul rate.

qvg at batch 1, 32k is also timed with ``attention="fused"`` and ``"staged"`` (the paths a call took
before the decode kernel).

``generate``: a Llama-3-8B-shaped model (random bf16 weights, ``--generate-layers`` of its 32 layers),
a 32k-token prompt and 256 greedy new tokens, the compressed caches in spans of ``--generate-span``
tokens (8,192: qvg's 256 centroids a KV head cost 0.5 bit an element there, 1 bit at 4,096):
tokens/s of the new tokens (prompt excluded: the time of generating 1 token is subtracted; the
median of ``ROUNDS`` runs, the caches taking turns), peak GPU memory and the K/V bytes, with
``QKVCache("kivi")`` and ``QKVCache("qvg")`` attending directly (``attn_implementation="qkv"``),
kivi again with ``encode_graphs=True`` (each group's encode replayed from a CUDA graph), kivi and
qvg again with ``attend_graphs=False`` (each layer's one-token attention run eagerly, not replayed
from a CUDA graph as ``direct=True`` does by default; ``--caches`` picks rows), qvg again with
``validate=False`` (no value check, and no read-back to the host, per appended token) and
transformers' ``DynamicCache``; each timed after a full warm-up run (cuDNN makes a plan
per key length once). The host's pace drifts between runs, so the same caches are also timed
step by step, taking turns at every step (:func:`step_rows`: one-token forwards after the prompt,
the median time of a step), with qvg also checking its values at every step.

    PYTHONPATH=. python3 benchmarks/bench_decode.py --out benchmarks/results/bench_decode_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton

from common import copy_bandwidth, matmul_rate, paired_ratio, peak_extra

import qkv
from qkv.caches.cuda_graph import cuda_graph

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SPAN = 4096
# The generate rows' spans: each span carries its centroids (qvg's 256 of D bf16 values a KV head),
# 1 bit an element at 4,096 tokens, 0.5 at 8,192 (``--generate-span``)
GENERATE_SPAN = 8192
TAIL = 1000
CASES = ((1, 32 * 1024), (1, 128 * 1024), (8, 32 * 1024))
QUERIES = (1, 16)
POLICIES = ("qvg", "kivi", "rtn", "quarot", "bf16")
ROUNDS = 3  # generate runs per cache, taking turns
STEPS = 256  # one-token forwards per cache in the interleaved step rows
DEVICE = "cuda"


def timed(fn, reps: int = 50, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean milliseconds of ``reps`` back-to-back calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def graph_timed(fn) -> float:
    """``timed`` of ``fn`` replayed from a CUDA graph (captured after a warm-up on a side stream)."""
    graph, _ = cuda_graph(fn)
    return timed(graph.replay)


def history(batch: int, tokens: int, seed: int = 0):
    """bf16 keys and values [B, 8, tokens + TAIL, 128] (keys with a per-channel offset, as RoPE'd
    keys have outlier channels)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (batch, KV_HEADS, tokens + TAIL, HEAD_DIM)
    offset = torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=g, device=DEVICE) * 2
    k = (torch.randn(shape, generator=g, device=DEVICE) + offset).bfloat16()
    v = torch.randn(shape, generator=g, device=DEVICE).bfloat16()
    return k, v


def build(policy: str, k: torch.Tensor, v: torch.Tensor) -> qkv.KVCache:
    cache = qkv.KVCache(qkv.build_policy(policy, clusters=256) if policy == "qvg" else policy,
                        span_tokens=SPAN, num_layers=1)
    for start in range(0, k.shape[2], SPAN):
        cache.append(0, k[:, :, start : start + SPAN], v[:, :, start : start + SPAN])
    return cache


def rows(bandwidth: float, rate: float) -> list[dict]:
    out = []
    for batch, tokens in CASES:
        k, v = history(batch, tokens)
        for sq in QUERIES:
            q = (torch.randn(batch, HEADS, sq, HEAD_DIM, device=DEVICE) * 0.5).bfloat16()

            def bf16():
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

            base = {"ms": timed(bf16), "graph_ms": graph_timed(bf16), "peak_extra": peak_extra(bf16),
                    "cache_bytes": 2 * k.numel() * k.element_size()}
            flops = 4.0 * batch * HEADS * sq * k.shape[2] * HEAD_DIM
            row = {"batch": batch, "history": tokens + TAIL, "queries": sq, "bf16_sdpa": base,
                   "bf16_floor_ms": (base["cache_bytes"] / bandwidth) * 1e3, "compute_floor_ms": flops / rate * 1e3}
            print(json.dumps({"batch": batch, "history": tokens, "queries": sq, "bf16": base}), flush=True)
            for policy in POLICIES:
                cache = build(policy, k, v)
                layer = cache.layer(0)
                mem = layer.memory()

                def attend():
                    return cache.attend(0, q)

                ref = bf16().float()
                got = attend()
                res = {"ms": timed(attend), "graph_ms": graph_timed(attend), "peak_extra": peak_extra(attend),
                       "compressed_bytes": mem.compressed, "tail_bytes": mem.tail,
                       "method": qkv.kernels.choose_method(q).value,
                       "max_abs_diff_vs_bf16": (got.float() - ref).abs().max().item()}
                read = mem.compressed + mem.tail + 2 * q.numel() * q.element_size()
                res["bytes_floor_ms"] = read / bandwidth * 1e3
                res["ratio"] = res["ms"] / base["ms"]
                res["graph_ratio"] = res["graph_ms"] / base["graph_ms"]
                res["peak_extra_over_compressed"] = res["peak_extra"] / mem.compressed
                if policy == "qvg" and batch == 1 and tokens == 32 * 1024:
                    for mode in ("fused", "staged"):
                        layer.config = dataclasses.replace(cache.config, attention=mode)
                        res[f"{mode}_ms"] = timed(attend, reps=5)
                        res[f"{mode}_peak_extra"] = peak_extra(attend)
                    layer.config = cache.config
                row[policy] = res
                print(json.dumps({policy: res}), flush=True)
                del cache, layer
            out.append(row)
        del k, v
        torch.cuda.empty_cache()
    return out


def llama(layers: int):
    """A Llama-3-8B-shaped ``LlamaForCausalLM`` with ``layers`` of its 32 layers, random bf16
    weights, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=128256, max_position_embeddings=40000)
    with torch.device(DEVICE):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def generate_rows(layers: int, span: int, runs: bool = True, only: list[str] | None = None,
                  ) -> tuple[list[dict], list[dict]]:
    """The ``generate`` rows (none unless ``runs``) and :func:`step_rows` of a model of ``layers``,
    for the caches named in ``only`` (default: all), in spans of ``span`` tokens."""
    from transformers import DynamicCache

    from qkv.caches.adapters.transformers_cache import ATTENTION, QKVCache

    model = llama(layers)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32 * 1024), device=DEVICE)
    caches = {
        "dynamic": ("sdpa", lambda: DynamicCache()),
        "kivi": (ATTENTION, lambda: QKVCache("kivi", span_tokens=span, direct=True)),
        # the same with each group's encode (every 32 tokens) replayed from a CUDA graph
        "kivi_graphs": (ATTENTION, lambda: QKVCache("kivi", span_tokens=span, direct=True, encode_graphs=True)),
        "qvg": (ATTENTION, lambda: QKVCache("qvg", span_tokens=span, direct=True)),
        # the same without the value check of the appended tokens (queued every CHECK_BATCH tokens)
        "qvg_unchecked": (ATTENTION, lambda: QKVCache("qvg", span_tokens=span, direct=True, validate=False)),
        # each layer's one-token attention not replayed from a CUDA graph (QKVCache(direct=True) replays it)
        "kivi_attend_eager": (ATTENTION, lambda: QKVCache("kivi", span_tokens=span, direct=True, attend_graphs=False)),
        "qvg_attend_eager": (ATTENTION, lambda: QKVCache("qvg", span_tokens=span, direct=True, attend_graphs=False)),
    }
    if only:
        caches = {name: caches[name] for name in only}

    def run(name, new):
        """Wall time of ``generate`` (ms) for ``new`` tokens with a fresh cache ``name``, and the cache."""
        attention, make = caches[name]
        model.set_attn_implementation(attention)
        cache = make()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, past_key_values=cache)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), cache

    for name in caches:
        run(name, 256)  # warm-up: kernels compiled, and cuDNN's plans made for every key length the runs and steps see
    # the caches take turns, ROUNDS times (the steps are host-bound: the host's pace drifts between runs)
    times = {name: [] for name in caches}
    rows = {}
    for _ in range(ROUNDS if runs else 0):
        for name in caches:
            first, _ = run(name, 1)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            total, cache = run(name, 256)
            peak = torch.cuda.max_memory_allocated() - before
            if name == "dynamic":
                kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            else:
                kv = cache.memory().total
            times[name].append(255 / ((total - first) * 1e-3))
            rows[name] = {"cache": name, "tokens_per_s": statistics.median(times[name]),
                          "tokens_per_s_rounds": times[name], "total_ms": total, "prompt_ms": first,
                          "peak_extra_bytes": peak, "kv_bytes": kv}
            del cache
            torch.cuda.empty_cache()
    for row in rows.values():
        print(json.dumps(row), flush=True)
    return list(rows.values()), step_rows(model, prompt, caches)


def step_rows(model, prompt: torch.Tensor, caches: dict, steps: int = STEPS) -> list[dict]:
    """The model's one-token forward with each cache, the caches taking turns at every step (a
    host that speeds up or slows down during the run weighs on all of them alike): after one
    forward of ``prompt`` into each cache, ``steps`` steps each, every step timed on its own
    (synchronized before and after); ``qvg_check_every_step`` is qvg with its value check queued
    at every step instead of every ``CHECK_BATCH`` tokens (``CHECK_BATCH = 1``). Each row keeps
    its steps' times, and the median ratio of each step to ``DynamicCache``'s step of the same
    turn with its 95% bootstrap interval (:func:`common.paired_ratio`)."""
    from qkv.caches import checks
    from qkv.caches.adapters.transformers_cache import ATTENTION

    variants = {**caches, **({"qvg_check_every_step": caches["qvg"]} if "qvg" in caches else {})}
    default = checks.CHECK_BATCH
    batch = {name: 1 if name == "qvg_check_every_step" else default for name in variants}
    made, times = {}, {name: [] for name in variants}
    positions = torch.arange(prompt.shape[1], prompt.shape[1] + steps, device=DEVICE)[None]
    # qkv's attention for every cache: it hands a DynamicCache's steps to transformers' SDPA as
    # "sdpa" does (switching the model's attention at every step costs more than a step)
    model.set_attn_implementation(ATTENTION)
    with torch.no_grad():
        for name, (_, make) in variants.items():
            made[name] = make()
            model(prompt, past_key_values=made[name], use_cache=True)
        for i in range(steps):
            order = list(variants)[i % len(variants):] + list(variants)[: i % len(variants)]
            for name in order:
                checks.CHECK_BATCH = batch[name]
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(prompt[:, -1:], past_key_values=made[name], use_cache=True, position_ids=positions[:, i : i + 1])
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) * 1e3)
    checks.CHECK_BATCH = default
    rows = []
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=10)
        rows.append({"cache": name, "step_ms_median": statistics.median(ms), "step_ms_p10": q[0], "step_ms_p90": q[-1],
                     "tokens_per_s": 1e3 / statistics.median(ms), "steps": steps, "step_ms": ms})
        if "dynamic" in times and name != "dynamic":  # step i of each cache ran next to DynamicCache's
            rows[-1]["step_ratio_to_dynamic"] = paired_ratio(ms, times["dynamic"])
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "step_ms"}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--generate-layers", type=int, default=8)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--skip-decode", action="store_true", help="only the generate rows")
    parser.add_argument("--steps-only", action="store_true", help="of the generate rows, only the interleaved steps")
    parser.add_argument("--caches", nargs="+", help="the generate rows' caches (default: all)")
    parser.add_argument("--generate-span", type=int, default=GENERATE_SPAN, help="the generate rows' span tokens")
    args = parser.parse_args()
    torch.manual_seed(0)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    env.update({"copy_bandwidth_bytes_per_s": bandwidth, "bf16_matmul_flops_per_s": rate})
    print(json.dumps(env), flush=True)
    result = {"env": env, "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "span": SPAN,
                                     "tail": TAIL}}
    if not args.skip_decode:
        result["decode"] = rows(bandwidth, rate)
        write(args.out, result)  # kept if the generate rows fail
    if not args.skip_generate:
        runs, steps = generate_rows(args.generate_layers, args.generate_span, not args.steps_only, args.caches)
        result["generate"] = {"layers": args.generate_layers, "span": args.generate_span, "rows": runs, "steps": steps}
    write(args.out, result)


def write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
