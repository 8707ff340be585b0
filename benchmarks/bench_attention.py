"""Attention that reads the compressed cache directly, at Wan2.1-1.3B shapes, on one GPU.

One self-attention layer: 12 heads x 128, chunks of 3 latent frames x 1,560 tokens = 4,680 tokens,
spans of 8 chunks, histories of 8 to 64 chunks (37,440 to 299,520 tokens); the current chunk's
4,680 queries attend to [history, chunk] (not causal). Measured in one run:

- ``attention``: time and peak memory of ``KVCache.attend`` with each ``attention`` option: the
  fused kernel (``"fused"``), one span decompressed at a time + torch's fused attention
  (``"staged"``), the whole history decompressed + ``scaled_dot_product_attention`` (``"read"``),
  and of a bf16 cache + SDPA (contiguous bf16 buffers, as Self-Forcing keeps them). Peak memory is
  ``max_memory_allocated`` during the call minus what was allocated before it (the cache, the
  queries and the chunk), next to the cache's own bytes.
- ``policies``: the fused kernel's time for every preset at 16 chunks.
- ``tiles``: the kernel's tile configurations tried at 16 chunks (the fastest is used throughout).
- ``end_to_end``: one Wan-1.3B transformer block forward on a chunk (self-attention with the cache,
  by the fused and the staged option, cross-attention to 512 text tokens, FFN 8,960; random bf16
  weights) plus the span compression amortized over its 8 chunks, vs the same block with a bf16
  cache.
- ``capacity``: the longest history whose K/V cache (30 layers of Wan-1.3B) fits in 24 GiB, per
  policy, from the bytes of spans actually compressed (``CompressedKV.nbytes``); and for qvg, per
  attention option, with the option's measured attention-time memory (one layer at a time) in the
  same budget.
- ``roofline``: bytes and FLOPs of the fused attention against the device's measured copy bandwidth
  and its dense bf16 matmul rate.

    PYTHONPATH=. python3 benchmarks/bench_attention.py --out benchmarks/results/bench_attention_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

import qkv
from qkv.kernels.triton import attention as fused_kernel

HEADS, HEAD_DIM, DIM, FFN, TEXT = 12, 128, 1536, 8960, 512
CHUNK = 3 * 1560
SPAN_CHUNKS = 8
LAYERS = 30
HISTORIES = (8, 16, 32, 64)
BUDGET = 24 * 2**30
TILES = [(64, 64, 4, 1, 1), (128, 64, 8, 1, 1), (128, 64, 8, 2, 2), (128, 64, 8, 3, 3), (128, 128, 8, 2, 2),
         (128, 128, 8, 3, 3), (256, 32, 8, 2, 2), (256, 64, 8, 2, 2), (256, 64, 8, 3, 3), (256, 128, 8, 2, 2),
         (256, 64, 16, 2, 2), (256, 128, 16, 2, 2)]
MODES = ("fused", "staged", "read")
DEVICE = "cuda"


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_extra(fn) -> int:
    """Bytes ``fn`` allocates at its peak beyond what is allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def clustered(seed: int, tokens: int | None = None, scale: float = 1.0) -> torch.Tensor:
    """[1, H, tokens (default: a chunk), D] bf16 with cluster structure (what k-means smoothing exploits)."""
    tokens = tokens or CHUNK
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    centres = torch.randn(HEADS, 64, HEAD_DIM, generator=g, device=DEVICE) * 2
    labels = torch.randint(0, 64, (HEADS, tokens), generator=g, device=DEVICE)
    x = torch.gather(centres, 1, labels.unsqueeze(-1).expand(-1, -1, HEAD_DIM))
    x = x + 0.5 * torch.randn(HEADS, tokens, HEAD_DIM, generator=g, device=DEVICE)
    return (x * scale).unsqueeze(0).bfloat16()


def flops(q_tokens: int, kv_tokens: int) -> float:
    return 4.0 * q_tokens * kv_tokens * HEAD_DIM * HEADS


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second."""
    src = torch.empty(512 * 2**20, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (timed(lambda: dst.copy_(src), reps=10) * 1e-3)


def matmul_rate() -> float:
    """Dense bf16 matmul FLOP/s (8192^3)."""
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    return 2 * 8192**3 / (timed(lambda: a @ a, reps=10) * 1e-3)


def sdpa_backends(q, k, v) -> dict:
    """Time of each SDPA backend on these inputs, and which the default picks (the fastest match)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {"default_ms": timed(lambda: F.scaled_dot_product_attention(q, k, v))}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                out[f"{backend.name.lower()}_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as exc:
            out[f"{backend.name.lower()}_ms"] = f"unavailable: {str(exc).splitlines()[0][:80]}"
    return out


# -- attention over a streaming cache ----------------------------------------------------------


class History:
    """A growing history: the qvg cache (one layer) and the bf16 buffers of the same chunks."""

    def __init__(self, policy: str, chunks: int) -> None:
        self.cache = qkv.KVCache(policy, span_chunks=SPAN_CHUNKS, num_layers=1)
        self.k_buf = torch.empty(1, HEADS, (chunks + 1) * CHUNK, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        self.v_buf = torch.empty_like(self.k_buf)
        self.chunks = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        a, b = self.chunks * CHUNK, (self.chunks + 1) * CHUNK
        self.k_buf[:, :, a:b], self.v_buf[:, :, a:b] = k, v
        self.cache.append(0, k, v)
        self.chunks += 1

    def attend(self, q, extra, mode: str):
        """``KVCache.attend`` with ``attention=mode``."""
        layer = self.cache.layer(0)
        layer.config = dataclasses.replace(self.cache.config, attention=mode)
        try:
            return layer.attend(q, extra=extra)
        finally:
            layer.config = self.cache.config

    def bf16(self, q, extra):
        """SDPA over the bf16 buffers, the chunk written in place after the history."""
        end = (self.chunks + 1) * CHUNK
        self.k_buf[:, :, end - CHUNK : end], self.v_buf[:, :, end - CHUNK : end] = extra
        return F.scaled_dot_product_attention(q, self.k_buf[:, :, :end], self.v_buf[:, :, :end])


def attention_rows(q, chunk) -> list[dict]:
    hist = History("qvg", max(HISTORIES))
    rows = []
    for c in range(max(HISTORIES)):
        hist.append(*chunk(c))
        n = c + 1
        if n not in HISTORIES:
            continue
        extra = chunk(1000 + n)
        cache_bytes = hist.cache.memory().total
        kv = flops(CHUNK, (n + 1) * CHUNK)
        row = {"history_chunks": n, "history_tokens": n * CHUNK, "cache_bytes": cache_bytes,
               "bf16_cache_bytes": 2 * n * CHUNK * HEADS * HEAD_DIM * 2, "flops": kv}
        fns = {mode: (lambda mode=mode: hist.attend(q, extra, mode)) for mode in MODES}
        fns["bf16_sdpa"] = lambda: hist.bf16(q, extra)
        for name, fn in fns.items():
            ms = timed(fn)
            row[name] = {"ms": ms, "tflops": kv / (ms * 1e-3) / 1e12, "peak_extra_bytes": peak_extra(fn)}
        for mode in MODES:
            row[mode]["peak_over_cache"] = (cache_bytes + row[mode]["peak_extra_bytes"]) / cache_bytes
            row[mode]["vs_bf16_sdpa"] = row[mode]["ms"] / row["bf16_sdpa"]["ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows[-1]["staged_parts"] = staged_parts(hist, q)
    return rows


def staged_parts(hist: History, q: torch.Tensor) -> dict:
    """Where the staged option's time goes: per span, its decompression, the fused attention with
    log-sum-exp over it, and one merge of two partial results."""
    from qkv.kernels.attention import default_scale, merge_partials, sdpa_with_lse

    span = next(s for s in hist.cache.layer(0).segments() if isinstance(s, qkv.kernels.CompressedSpan))
    k, v = span.materialize()
    scale = default_scale(q, None)
    part = sdpa_with_lse(q, k, v, scale)
    state = merge_partials(None, part)
    row = {"span_tokens": span.tokens, "decompress_ms": timed(span.materialize),
           "sdpa_with_lse_ms": timed(lambda: sdpa_with_lse(q, k, v, scale)),
           "merge_ms": timed(lambda: merge_partials(state, part))}
    print(json.dumps(row), flush=True)
    return row


def span_of(policy: qkv.Policy, seed: int) -> qkv.caches.CompressedKV:
    """One span (8 chunks) compressed by ``policy``."""
    k, v = clustered(seed, SPAN_CHUNKS * CHUNK, 2.0), clustered(seed + 1, SPAN_CHUNKS * CHUNK)
    return policy.compress(k, v)


def policy_rows(q, chunk) -> tuple[list[dict], dict]:
    """Fused time per preset at 16 chunks (2 spans), and each preset's span bytes."""
    from qkv.kernels import CompressedSpan, DenseKV

    rows, spans = [], {}
    extra = DenseKV(*chunk(7))
    for name in qkv.list_policies():
        policy = qkv.build_policy(name)
        span = span_of(policy, 10)
        spans[name] = span.nbytes
        segments = [CompressedSpan(span, policy), CompressedSpan(span_of(policy, 12), policy), extra]
        ms = timed(lambda: qkv.kernels.attention(q, segments))
        rows.append({"policy": name, "ms": ms, "tflops": flops(CHUNK, 17 * CHUNK) / (ms * 1e-3) / 1e12,
                     "read_directly": fused_kernel.span_support(segments[0], q) is None, "span_bytes": span.nbytes})
        print(json.dumps(rows[-1]), flush=True)
    return rows, spans


def tile_rows(q, chunk) -> list[dict]:
    """Time of each tile configuration at 16 chunks (qvg and bf16 spans); sets the fastest for qvg."""
    from qkv.kernels import CompressedSpan, DenseKV

    extra = DenseKV(*chunk(7))
    rows = []
    for name in ("qvg", "bf16"):
        policy = qkv.build_policy(name)
        segments = [CompressedSpan(span_of(policy, 20), policy), CompressedSpan(span_of(policy, 22), policy), extra]
        for tiles in TILES:
            fused_kernel.GPU_TILES = (tiles,)
            try:
                ms = timed(lambda: qkv.kernels.attention(q, segments))
            except Exception as exc:  # a configuration the GPU cannot run (shared memory): recorded
                ms = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            rows.append({"policy": name, "tiles": tiles, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    timings = sorted((r for r in rows if r["policy"] == "qvg" and isinstance(r["ms"], float)), key=lambda r: r["ms"])
    fused_kernel.GPU_TILES = tuple(r["tiles"] for r in timings)  # fastest first, the others as fallbacks
    return rows


# -- one Wan-1.3B block ------------------------------------------------------------------------


class WanBlock(nn.Module):
    """A Wan2.1-1.3B transformer block (adaLN-modulated self-attention, cross-attention, FFN)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.norm_q, self.norm_k = nn.RMSNorm(DIM, eps=1e-6), nn.RMSNorm(DIM, eps=1e-6)
        self.out = nn.Linear(DIM, DIM)
        self.norm3 = nn.LayerNorm(DIM, eps=1e-6)
        self.cross_q, self.cross_kv, self.cross_out = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, DIM))
        self.modulation = nn.Parameter(torch.randn(1, 6, DIM) / DIM**0.5)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)  # [B, H, S, D]

    def forward(self, x, text, attend):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation.unbind(1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = self.heads(self.norm_q(q)), self.heads(self.norm_k(k)), self.heads(v)
        x = x + gate1 * self.out(attend(q, k, v).transpose(1, 2).flatten(2))
        ck, cv = self.cross_kv(text).chunk(2, dim=-1)
        c = F.scaled_dot_product_attention(self.heads(self.cross_q(self.norm3(x))), self.heads(ck), self.heads(cv))
        x = x + self.cross_out(c.transpose(1, 2).flatten(2))
        return x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2)


def end_to_end_rows(chunk) -> list[dict]:
    block = WanBlock().to(DEVICE).bfloat16()
    g = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(1, CHUNK, DIM, generator=g, device=DEVICE).bfloat16()
    text = torch.randn(1, TEXT, DIM, generator=g, device=DEVICE).bfloat16()
    hist = History("qvg", max(HISTORIES))
    policy = hist.cache.config.span_policy
    # the span compression as the cache runs it (warm-started from the previous span)
    k, v = clustered(50, SPAN_CHUNKS * CHUNK, 2.0), clustered(51, SPAN_CHUNKS * CHUNK)
    warm = policy.compress(k, v)
    compress_ms = timed(lambda: policy.compress(k, v, warm_start=warm), reps=5, warmup=1)
    rows = []
    with torch.no_grad():
        for c in range(max(HISTORIES)):
            hist.append(*chunk(c))
            n = c + 1
            if n not in HISTORIES:
                continue
            plain = timed(lambda: block(x, text, lambda q, k, v: hist.bf16(q, (k, v))))
            row = {"history_chunks": n, "block_bf16_ms": plain, "span_compress_ms": compress_ms}
            for mode in ("fused", "staged"):
                ms = timed(lambda: block(x, text, lambda q, k, v: hist.attend(q, (k, v), mode)))
                ours = ms + compress_ms / SPAN_CHUNKS
                # Self-Forcing runs 4 denoising forwards and 1 clean forward per chunk
                row[mode] = {"block_ms": ms, "chunk_ms": ours, "overhead": ours / plain - 1,
                             "overhead_5_forwards": (5 * ms + compress_ms / SPAN_CHUNKS) / (5 * plain) - 1}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def mode_capacity_rows(span_bytes: dict, attention: list[dict]) -> list[dict]:
    """Longest qvg history in BUDGET with each attention option's measured transient memory: the
    largest peak extra measured for fused and staged (it does not grow with the history), and for
    read the peak extra per history chunk at the longest history (the whole layer decompressed)."""
    per_chunk = span_bytes["qvg"] / SPAN_CHUNKS * LAYERS
    longest = attention[-1]
    rows = []
    for mode in MODES:
        if mode == "read":
            growth = longest[mode]["peak_extra_bytes"] / (longest["history_chunks"] + 1)
            chunks = int(BUDGET // (per_chunk + growth))
        else:
            fixed = max(r[mode]["peak_extra_bytes"] for r in attention)
            chunks = int((BUDGET - fixed) // per_chunk)
        rows.append({"attention": mode, "chunks_in_budget": chunks})
    bf16_chunk = 2 * CHUNK * HEADS * HEAD_DIM * 2 * LAYERS
    rows.append({"attention": "bf16_sdpa", "chunks_in_budget": int(BUDGET // bf16_chunk)})
    return rows


def capacity_rows(span_bytes: dict) -> list[dict]:
    """Longest history in BUDGET (30 layers, K and V), from measured span bytes."""
    bf16_chunk = 2 * CHUNK * HEADS * HEAD_DIM * 2 * LAYERS
    rows = []
    for name, nbytes in span_bytes.items():
        per_chunk = nbytes / SPAN_CHUNKS * LAYERS
        steady = int(BUDGET // per_chunk)
        # worst case: the newest span_chunks - 1 chunks still wait, in bf16, for their span
        pending = (SPAN_CHUNKS - 1) * bf16_chunk
        worst = int((BUDGET - pending) // per_chunk) + SPAN_CHUNKS - 1 if per_chunk < bf16_chunk else steady
        rows.append({"policy": name, "bytes_per_chunk_all_layers": per_chunk, "bits_per_element":
                     8 * nbytes / (2 * SPAN_CHUNKS * CHUNK * HEADS * HEAD_DIM),
                     "chunks_in_budget": steady, "chunks_in_budget_with_bf16_tail": worst,
                     "x_bf16": per_chunk and bf16_chunk / per_chunk})
    return rows


def roofline(rows: list[dict], bandwidth: float, rate: float) -> list[dict]:
    out = []
    for r in rows:
        n = r["history_chunks"]
        moved = r["cache_bytes"] + 2 * CHUNK * HEADS * HEAD_DIM * 2 * 2  # cache + chunk K/V, q, out
        out.append({"history_chunks": n, "bytes": moved, "memory_floor_ms": moved / bandwidth * 1e3,
                    "flops": r["flops"], "compute_floor_ms": r["flops"] / rate * 1e3,
                    "fused_ms": r["fused"]["ms"], "staged_ms": r["staged"]["ms"],
                    "fraction_of_compute_floor": r["flops"] / rate * 1e3 / r["fused"]["ms"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    chunks = {}

    def chunk(i):
        if i not in chunks:
            chunks[i] = (clustered(2 * i, scale=2.0), clustered(2 * i + 1))
        return chunks[i]

    q = clustered(999) * 0.1
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    env.update({"copy_bandwidth_bytes_per_s": bandwidth, "bf16_matmul_flops_per_s": rate})
    k16 = torch.randn(1, HEADS, 17 * CHUNK, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    env["sdpa_16_chunks"] = sdpa_backends(q, k16, k16)
    del k16
    print(json.dumps(env), flush=True)
    result = {"env": env, "shapes": {"heads": HEADS, "head_dim": HEAD_DIM, "chunk_tokens": CHUNK,
                                     "span_chunks": SPAN_CHUNKS, "layers": LAYERS, "budget_bytes": BUDGET}}
    result["tiles"] = tile_rows(q, chunk)
    result["gpu_tiles"] = fused_kernel.GPU_TILES
    result["attention"] = attention_rows(q, chunk)
    result["policies"], span_bytes = policy_rows(q, chunk)
    result["end_to_end"] = end_to_end_rows(chunk)
    result["capacity"] = capacity_rows(span_bytes)
    result["capacity_by_attention"] = mode_capacity_rows(span_bytes, result["attention"])
    result["roofline"] = roofline(result["attention"], bandwidth, rate)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
