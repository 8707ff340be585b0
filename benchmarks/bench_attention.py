"""Attention that reads the compressed cache directly, at Wan2.1-1.3B shapes, on one GPU.

One self-attention layer: 12 heads x 128, chunks of 3 latent frames x 1,560 tokens = 4,680 tokens,
spans of 8 chunks, histories of 8 to 64 chunks (37,440 to 299,520 tokens); the current chunk's
4,680 queries attend to [history, chunk] (not causal). Measured in one run:

- ``attention``: time and peak memory of ``KVCache.attend`` with each ``attention`` option: the
  fused kernel (``"fused"``), one span decompressed at a time + torch's fused attention
  (``"staged"``), the whole history decompressed + ``scaled_dot_product_attention`` (``"read"``),
  and of a bf16 cache + SDPA (contiguous bf16 buffers, as Self-Forcing keeps them; plain, and with
  the staged option's key split, ``bf16_sdpa_split``). Peak memory is
  ``max_memory_allocated`` during the call minus what was allocated before it (the cache, the
  queries and the chunk), next to the cache's own bytes.
- ``policies``: the time of the fused kernel and of the default (``auto``) for every preset at 16 chunks.
- ``tiles``: the kernel's tile configurations tried at 16 chunks (the fastest is used throughout).
- ``end_to_end``: one Wan-1.3B transformer block forward on a chunk (self-attention with the cache,
  by the fused and the staged option, cross-attention to 512 text tokens, FFN 8,960; random bf16
  weights) plus the span compression amortized over its 8 chunks, vs the same block with a bf16
  cache.
- ``self_forcing``: end to end as Self-Forcing runs each block: per chunk 4 denoising forwards
  and the clean forward that appends to the cache, queued back to back, over the 8 chunks of a
  span (one span compression), vs the same with a bf16 cache. Run twice on fresh histories:
  ``self_forcing_first_pass`` includes one-time costs (Triton kernels loaded for new
  specializations, cuDNN plans for new key lengths, the allocator's growth), which a long rollout
  pays once; ``self_forcing`` is the second pass.
- ``key_split``: torch's fused attention with the keys cut into 1-4 pieces attended to in one call
  as batch entries (what the staged option does, ``kernels.attention.KEY_SPLIT``).
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

from common import copy_bandwidth, matmul_rate, peak_extra

import qkv
from qkv.kernels.triton import attention as fused_kernel
from qkv.kernels.triton.tiles import tile_for

HEADS, HEAD_DIM, DIM, FFN, TEXT = 12, 128, 1536, 8960, 512
CHUNK = 3 * 1560
SPAN_CHUNKS = 8
LAYERS = 30
HISTORIES = (8, 16, 32, 64)
BUDGET = 24 * 2**30
TILES = [(64, 64, 4, 1, 1), (128, 64, 8, 1, 1), (128, 64, 8, 2, 2), (128, 64, 8, 3, 3), (128, 128, 8, 2, 2),
         (128, 128, 8, 3, 3), (256, 32, 8, 2, 2), (256, 64, 8, 2, 2), (256, 64, 8, 3, 3), (256, 128, 8, 2, 2),
         (256, 64, 16, 2, 2), (256, 128, 16, 2, 2)]
MODES = ("auto", "fused", "staged", "read")
PARTS = ("tiles", "attention", "policies", "end_to_end", "self_forcing", "key_split")
DEVICE = "cuda"


REPS = 5  # timed calls per measurement (``--reps``)


def timed(fn, reps: int | None = None, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls (default :data:`REPS`; CUDA events)."""
    reps = reps or REPS
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

    def append(self, k: torch.Tensor, v: torch.Tensor, cache: bool = True, bf16: bool = True) -> None:
        """Append a chunk to the compressed cache and / or the bf16 buffers."""
        a, b = self.chunks * CHUNK, (self.chunks + 1) * CHUNK
        if bf16:
            self.k_buf[:, :, a:b], self.v_buf[:, :, a:b] = k, v
        if cache:
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

    def bf16(self, q, extra, split: bool = False):
        """SDPA over the bf16 buffers, the chunk written in place after the history; ``split``: with
        the staged option's key split (kernels.attention.sdpa_split) instead of one plain call."""
        end = (self.chunks + 1) * CHUNK
        self.k_buf[:, :, end - CHUNK : end], self.v_buf[:, :, end - CHUNK : end] = extra
        k, v = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        if split:
            return qkv.kernels.attention_staged(q, [qkv.kernels.DenseKV(k, v)])
        return F.scaled_dot_product_attention(q, k, v)


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
        fns["bf16_sdpa_split"] = lambda: hist.bf16(q, extra, split=True)
        for name, fn in fns.items():
            ms = timed(fn)
            row[name] = {"ms": ms, "tflops": kv / (ms * 1e-3) / 1e12, "peak_extra_bytes": peak_extra(fn)}
        for mode in MODES:
            row[mode]["peak_over_cache"] = (cache_bytes + row[mode]["peak_extra_bytes"]) / cache_bytes
            # the output, which every option returns, left out
            row[mode]["peak_over_cache_without_output"] = (
                cache_bytes + row[mode]["peak_extra_bytes"] - q.numel() * q.element_size()) / cache_bytes
            row[mode]["vs_bf16_sdpa"] = row[mode]["ms"] / row["bf16_sdpa"]["ms"]
            row[mode]["vs_bf16_sdpa_split"] = row[mode]["ms"] / row["bf16_sdpa_split"]["ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows[-1]["staged_parts"] = staged_parts(hist, q)
    return rows


def staged_parts(hist: History, q: torch.Tensor) -> dict:
    """Where the staged option's time goes: per span, its decompression, the fused attention with
    log-sum-exp over it (in one piece and cut into KEY_SPLIT), and one merge of two partial results
    (the kernel the dispatcher picks, and the torch reference)."""
    from qkv.kernels.attention import default_scale, sdpa_split, sdpa_with_lse

    span = next(s for s in hist.cache.layer(0).segments() if isinstance(s, qkv.kernels.CompressedSpan))
    k, v = span.materialize()
    scale = default_scale(q, None)
    part = sdpa_with_lse(q, k, v, scale)
    state = qkv.kernels.merge_partials(None, part)
    row = {"span_tokens": span.tokens, "decompress_ms": timed(span.materialize),
           "sdpa_with_lse_ms": timed(lambda: sdpa_with_lse(q, k, v, scale)),
           "sdpa_split_ms": timed(lambda: sdpa_split(q, k, v, scale)),
           "merge_ms": timed(lambda: qkv.kernels.merge_partials(state, part)),
           "merge_torch_ms": timed(lambda: qkv.kernels.merge_partials(state, part, backend="torch"))}
    print(json.dumps(row), flush=True)
    return row


def key_split_rows(q) -> list[dict]:
    """Fused attention time with the keys cut into n equal pieces, attended to in one call as
    separate batch entries (kernels.attention.sdpa_split with KEY_SPLIT = n): one span, and a
    64-chunk bf16 history."""
    from qkv.kernels.attention import sdpa_split

    rows = []
    for tokens in (SPAN_CHUNKS * CHUNK, 65 * CHUNK):
        k = torch.randn(1, HEADS, tokens, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        for n in (1, 2, 3, 4):
            rows.append({"keys": tokens, "pieces": n, "ms": timed(lambda: sdpa_split(q, k, v, HEAD_DIM**-0.5, n))})
            print(json.dumps(rows[-1]), flush=True)
        del k, v
    return rows


def span_of(policy: qkv.Policy, seed: int) -> qkv.caches.CompressedKV:
    """One span (8 chunks) compressed by ``policy``."""
    k, v = clustered(seed, SPAN_CHUNKS * CHUNK, 2.0), clustered(seed + 1, SPAN_CHUNKS * CHUNK)
    return policy.compress(k, v)


def policy_rows(q, chunk) -> tuple[list[dict], dict]:
    """Per preset at 16 chunks (2 spans): the time of the fused kernel and of the default
    (``auto``, the method it picks named), and each preset's span bytes."""
    from qkv.kernels import CompressedSpan, DenseKV

    rows, spans = [], {}
    extra = DenseKV(*chunk(7))
    auto = qkv.kernels.choose_method(q).value
    for name in qkv.list_policies():
        policy = qkv.build_policy(name)
        span = span_of(policy, 10)
        spans[name] = span.nbytes
        segments = [CompressedSpan(span), CompressedSpan(span_of(policy, 12)), extra]
        ms = {m: timed(lambda m=m: qkv.kernels.attention(q, segments, method=m)) for m in ("fused", "auto")}
        rows.append({"policy": name, "fused_ms": ms["fused"], "auto_ms": ms["auto"], "auto_method": auto,
                     "fused_tflops": flops(CHUNK, 17 * CHUNK) / (ms["fused"] * 1e-3) / 1e12,
                     "read_directly": fused_kernel.span_support(segments[0], q) is None, "span_bytes": span.nbytes})
        print(json.dumps(rows[-1]), flush=True)
    return rows, spans


def tile_rows(q, chunk) -> list[dict]:
    """Time of each tile configuration at 16 chunks (qvg and bf16 spans), passed to the kernel one
    at a time (the library's own choice, ``qkv.kernels.triton.tiles``, is not changed: the result lists the order
    the sweep found, for that table)."""
    from qkv.kernels import CompressedSpan, DenseKV

    extra = DenseKV(*chunk(7))
    rows = []
    for name in ("qvg", "bf16"):
        policy = qkv.build_policy(name)
        segments = [CompressedSpan(span_of(policy, 20)), CompressedSpan(span_of(policy, 22)), extra]
        for tiles in TILES:
            try:
                ms = timed(lambda: fused_kernel.attention_triton(q, segments, tiles=(tiles,)))
            except Exception as exc:  # a configuration the GPU cannot run (shared memory): recorded
                ms = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
            rows.append({"policy": name, "tiles": tiles, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
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


def self_forcing_chunk(block, x, text, hist: History, mode: str) -> float:
    """Milliseconds of one chunk of Self-Forcing's loop on this block: 4 denoising forwards that
    attend to [history, chunk], then the clean forward that appends the chunk's K/V (the cache
    compresses a span every SPAN_CHUNKS chunks), queued back to back and timed as one region.
    One denoising forward runs first, untimed, so that every call has run once at this length
    (torch builds a cuDNN plan per new key length)."""

    def attend(q, k, v):
        return hist.bf16(q, (k, v)) if mode == "bf16" else hist.attend(q, (k, v), mode)

    def attend_and_append(q, k, v):
        out = attend(q, k, v)
        hist.append(k, v, cache=mode != "bf16", bf16=mode == "bf16")
        return out

    block(x, text, attend)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4):
        block(x, text, attend)
    block(x, text, attend_and_append)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def self_forcing_rows(chunk) -> list[dict]:
    """End to end as Self-Forcing runs a block: from each history length, the next SPAN_CHUNKS
    chunks (one span compression among them), per chunk 5 forwards of the block; ms per chunk with
    the compressed cache (fused / staged attention) vs the bf16 cache, growing side by side."""
    block = WanBlock().to(DEVICE).bfloat16()
    g = torch.Generator(device=DEVICE).manual_seed(6)
    text = torch.randn(1, TEXT, DIM, generator=g, device=DEVICE).bfloat16()
    modes = ("bf16", "auto", "fused", "staged")
    hists = {mode: History("qvg", max(HISTORIES) + SPAN_CHUNKS) for mode in modes}
    xs = [torch.randn(1, CHUNK, DIM, generator=g, device=DEVICE).bfloat16() for _ in range(SPAN_CHUNKS)]
    rows = []
    with torch.no_grad():
        for n in HISTORIES:
            for mode, hist in hists.items():
                while hist.chunks < n:
                    hist.append(*chunk(hist.chunks), cache=mode != "bf16", bf16=mode == "bf16")
            row = {"history_chunks": n}
            for mode, hist in hists.items():
                total = 0.0
                for x in xs:
                    total += self_forcing_chunk(block, x, text, hist, mode)
                row[mode] = {"chunk_ms": total / SPAN_CHUNKS}
            for mode in modes[1:]:
                row[mode]["overhead"] = row[mode]["chunk_ms"] / row["bf16"]["chunk_ms"] - 1
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
    global REPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--reps", type=int, default=REPS, help="timed calls per measurement (their median is kept)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    REPS = args.reps
    parts = set(args.parts.split(","))
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
    result["parts"] = sorted(parts)
    result["reps"] = REPS
    if "tiles" in parts:
        result["tiles"] = tile_rows(q, chunk)
    result["gpu_tiles"] = tile_for("attention", torch.device("cuda"), 1).order
    if "tiles" in result:
        qvg = sorted((r for r in result["tiles"] if r["policy"] == "qvg" and isinstance(r["ms"], float)), key=lambda r: r["ms"])
        result["fastest_tiles_qvg"] = [r["tiles"] for r in qvg]
    if "attention" in parts:
        result["attention"] = attention_rows(q, chunk)
        result["roofline"] = roofline(result["attention"], bandwidth, rate)
    if "policies" in parts:
        result["policies"], span_bytes = policy_rows(q, chunk)
        result["capacity"] = capacity_rows(span_bytes)
        if "attention" in parts:
            result["capacity_by_attention"] = mode_capacity_rows(span_bytes, result["attention"])
    if "end_to_end" in parts:
        result["end_to_end"] = end_to_end_rows(chunk)
    if "self_forcing" in parts:
        result["self_forcing_first_pass"] = self_forcing_rows(chunk)
        result["self_forcing"] = self_forcing_rows(chunk)
    if "key_split" in parts:
        result["key_split"] = key_split_rows(q)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
