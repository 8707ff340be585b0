"""What a Self-Forcing rollout's cache holds per layer, by span length and clusters (bytes only).

One layer of Wan2.1-1.3B attention as Self-Forcing fills it: chunks of 3 latent frames x 1,560
tokens, 12 heads x 128, bf16. For each (span_chunks, clusters) a :class:`qkv.KVCache` with the qvg
policy takes ``--chunks`` chunks; the script reports what it holds after each chunk
(``memory().total``: compressed spans and the chunks still waiting in bf16) against the bf16
chunks themselves, and the bytes of one compressed chunk; ``ratio_denoising_at`` counts, as a
rollout holds it while chunk n is denoised, the n - 1 chunks before it as stored and chunk n
itself in bf16 (upstream's cache and qkv's both hold the chunk being denoised in bf16). Stored
sizes depend on the shapes and formats, not on the values, so random K/V give the real figures
and this runs on a CPU; it says nothing about quality or speed.

    PYTHONPATH=. python3 benchmarks/rollout_bytes.py --chunks 64 --out benchmarks/results/rollout_bytes.json
"""

from __future__ import annotations

import argparse

import torch
from common import write_json
from tqdm import tqdm

import qkv

HEADS, HEAD_DIM, CHUNK = 12, 128, 3 * 1560
CONFIGS = ((8, 256), (1, 256), (1, 128), (1, 64), (1, 32), (1, 16))  # (span_chunks, clusters); the first is the default
AT = (8, 16, 24, 32, 48, 64)  # chunks at which the ratios are reported


def rollout(span_chunks: int, clusters: int, chunks: int) -> dict:
    cache = qkv.KVCache(qkv.build_policy("qvg", clusters=clusters), num_layers=1, span_chunks=span_chunks)
    bf16_chunk = 2 * HEADS * CHUNK * HEAD_DIM * 2  # K and V
    held = []
    gen = torch.Generator().manual_seed(0)
    for _ in tqdm(range(chunks), desc=f"span_chunks={span_chunks}, clusters={clusters}", leave=False):
        k, v = (torch.randn(1, HEADS, CHUNK, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
        cache.append(0, k, v)
        held.append(cache.memory().total)
    compressed = cache.layer(0).spans[0].ckv.nbytes / span_chunks
    return {"span_chunks": span_chunks, "clusters": clusters, "bf16_chunk_bytes": bf16_chunk,
            "compressed_chunk_bytes": compressed, "chunk_ratio": bf16_chunk / compressed,
            "held_bytes": held, "ratio_at": {n: n * bf16_chunk / held[n - 1] for n in AT if n <= chunks},
            # while chunk n is denoised: the n - 1 before it as stored, chunk n in bf16 (in both caches)
            "ratio_denoising_at": {n: n * bf16_chunk / (held[n - 2] + bf16_chunk) for n in AT if n <= chunks}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--chunks", type=int, default=32)
    args = parser.parse_args()
    rows = [rollout(s, c, args.chunks) for s, c in CONFIGS]
    for r in rows:
        print(f"span_chunks={r['span_chunks']} clusters={r['clusters']}: {r['chunk_ratio']:.2f}x per compressed chunk, "
              + ", ".join(f"{r['ratio_at'][n]:.2f}x at {n}" for n in r["ratio_at"]))
    write_json(args.out, {"shape": {"heads": HEADS, "head_dim": HEAD_DIM, "chunk_tokens": CHUNK}, "rows": rows})


if __name__ == "__main__":
    main()
