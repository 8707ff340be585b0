"""Moving one layer's KV cache off the GPU and back: compressed bytes vs the bf16 history.

A Wan2.1-1.3B self-attention layer (12 heads x 128, chunks of 3 latent frames x 1,560 tokens,
spans of 8 chunks, qvg) holding ``--chunks`` chunks: the bytes moved and the time of
``pack_layer`` + device-to-host copy (pinned) + host-to-device copy + ``unpack_layer``, against
copying the bf16 history (K and V) to pinned host memory and back. The host round trip is what a
pipeline that offloads or hands over a block's cache pays; between GPUs the same buffer is sent
with ``send_layer`` / ``broadcast_layer``.

    python benchmarks/bench_transfer.py --out benchmarks/results/bench_transfer_h200.json
"""

from __future__ import annotations

import argparse

import torch
from common import clustered, ms, write_json

import qkv
from qkv.caches.transfer import pack_layer, unpack_layer

HEADS, HEAD_DIM, CHUNK, SPAN_CHUNKS = 12, 128, 3 * 1560, 8


def filled(policy: str, chunks: int) -> qkv.KVCache:
    cache = qkv.KVCache(policy, span_chunks=SPAN_CHUNKS)
    for i in range(chunks):
        cache.append(0, clustered((1, HEADS, CHUNK, HEAD_DIM), seed=2 * i), clustered((1, HEADS, CHUNK, HEAD_DIM), seed=2 * i + 1))
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/bench_transfer.json")
    args = parser.parse_args()
    rows = []
    for policy in ("qvg", "kivi", "rtn"):
        cache = filled(policy, args.chunks)
        k, v = cache.read(0)
        history = k.numel() * k.element_size() * 2
        host_k, host_v = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (k, v))

        def bf16_round_trip():
            host_k.copy_(k, non_blocking=True)
            host_v.copy_(v, non_blocking=True)
            k.copy_(host_k, non_blocking=True)
            v.copy_(host_v, non_blocking=True)

        buffer, header = pack_layer(cache.layer(0))
        host = torch.empty(buffer.shape, dtype=torch.uint8, pin_memory=True)
        target = qkv.KVCache(policy, span_chunks=SPAN_CHUNKS)

        def compressed_round_trip():
            packed, head = pack_layer(cache.layer(0))
            host.copy_(packed, non_blocking=True)
            unpack_layer(target.layer(0), host.to("cuda", non_blocking=True), head)

        compressed_round_trip()
        exact = all(torch.equal(a, b) for a, b in zip(cache.read(0), target.read(0)))
        row = {
            "policy": policy, "chunks": args.chunks, "tokens": k.shape[2],
            "bf16_bytes": history, "compressed_bytes": buffer.numel(), "ratio": history / buffer.numel(),
            "bf16_round_trip_ms": ms(bf16_round_trip, warmup=3, rep=20),
            "compressed_round_trip_ms": ms(compressed_round_trip, warmup=3, rep=20),
            "exact": exact,
        }
        rows.append(row)
        print(row, flush=True)
        del cache, target, k, v, host_k, host_v, host, buffer
        torch.cuda.empty_cache()
    write_json(args.out, {"layer": {"heads": HEADS, "head_dim": HEAD_DIM, "chunk_tokens": CHUNK, "span_chunks": SPAN_CHUNKS},
                          "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
