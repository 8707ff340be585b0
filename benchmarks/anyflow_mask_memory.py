"""Memory and time of AnyFlow-FAR's prefill mask: upstream's ``build_attention_mask(mode="cache")``
against ``qkv.adapters.anyflow_far.cache_block_mask`` (the same ``BlockMask``, built blockwise).

Upstream evaluates its mask function on every (query, key) pair of the context at once
(``create_block_mask`` without compilation), so its memory grows with the square of the context;
the blockwise build reads one chunk index per 128-token block. At the benchmark's sizes
(``bench_pipelines.py --clients anyflow_far``: Wan2.1-1.3B patches, 480 x 832 video, chunk
partition 1 + 3 x (chunks - 1), ``full_chunk_limit`` 3), for the prefill after chunk ``n``: the
context's tokens, each builder's peak memory (GPU: ``max_memory_allocated`` beyond what was
allocated before; CPU: the peak resident set of a fresh process beyond its resident set before
the call) and its wall time, and whether the two masks are equal (every block index; the mask on
every pair too where the context has at most 4,096 tokens).

    PYTHONPATH=. python3 benchmarks/anyflow_mask_memory.py --chunks 8 16 --out benchmarks/results/anyflow_mask_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

LAT_H, LAT_W, LIMIT = 60, 104, 3
CONFIG = SimpleNamespace(config=SimpleNamespace(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
                                                full_chunk_limit=LIMIT))
FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def build(which: str, chunks: int, device: str):
    from diffusers.models.transformers.transformer_anyflow_far import AnyFlowFARTransformer3DModel

    from qkv.caches.adapters.anyflow_far import cache_block_mask

    part = [1] + [3] * (chunks - 1)
    if which == "upstream":
        return AnyFlowFARTransformer3DModel.build_attention_mask(CONFIG, chunk_partition=part, height=LAT_H,
                                                                 width=LAT_W, device=device, mode="cache")
    return cache_block_mask(CONFIG, part, LAT_H, LAT_W, device)


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(which: str, chunks: int, device: str) -> dict:
    """One build in this process: its peak memory beyond what was held before, and its time."""
    build(which, 1, device)  # imports and the device's context, before the baseline
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss()
    t = time.perf_counter()
    mask = build(which, chunks, device)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss()) - before
    return {"tokens": mask.seq_lengths[0], "peak_bytes": peak, "seconds": seconds}


def in_fresh_process(which: str, chunks: int, device: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", which, str(chunks), "--device", device],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def same(chunks: int, device: str) -> bool:
    from torch.nn.attention.flex_attention import create_mask

    up, ours = build("upstream", chunks, device), build("blockwise", chunks, device)
    if not all(torch.equal(getattr(up, f), getattr(ours, f)) for f in FIELDS):
        return False
    n = up.seq_lengths[0]
    return n > 4096 or torch.equal(create_mask(up.mask_mod, 1, 1, n, n, device),
                                   create_mask(ours.mask_mod, 1, 1, n, n, device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("BUILDER", "CHUNKS"), help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.device)))
        return
    rows = []
    for chunks in args.chunks:
        row = {"chunks": chunks}
        for which in ("upstream", "blockwise"):
            row[which] = in_fresh_process(which, chunks, args.device)
        row["tokens"] = row["upstream"]["tokens"]
        row["equal"] = same(chunks, args.device)
        rows.append(row)
        print(f"{chunks} chunks, {row['tokens']} tokens: upstream {row['upstream']['peak_bytes'] / 1e9:.2f} GB "
              f"{row['upstream']['seconds']:.3f} s, blockwise {row['blockwise']['peak_bytes'] / 1e9:.3f} GB "
              f"{row['blockwise']['seconds']:.4f} s, equal {row['equal']}", flush=True)
    if args.out:
        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from common import write_json

        write_json(pathlib.Path(args.out), {"device": args.device, "latent": [LAT_H, LAT_W], "full_chunk_limit": LIMIT,
                                            "rows": rows})


if __name__ == "__main__":
    main()
