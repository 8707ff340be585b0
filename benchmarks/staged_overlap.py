"""The staged path's groups decompressed on a side stream while the segment before each is
attended to (the default on a GPU, ``SpanPlan.materialize_ahead``), against the same work on one
stream (each group decompressed in its turn's place, before the attention it would overlap), and
against SDPA over the bf16 cache: ``bench_attention.py``'s Wan-1.3B layer (12 heads x 128, a
4,680-token chunk attending to 8-64 chunks of qvg history in 8-chunk spans, plus itself).

Each row: the median of 9 calls (CUDA events) of each variant, then all three again in the other
order (the GPU's clock drifts), the peak memory each allocates beyond what is held, and the
largest difference between the two staged outputs (the same kernels: 0 expected).

    PYTHONPATH=.:benchmarks python3 benchmarks/staged_overlap.py --out benchmarks/results/staged_overlap_h100.json
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_attention import History, clustered, timed
from common import environment, write_json

from qkv.kernels.attention import SpanPlan

REAL_AHEAD = SpanPlan.materialize_ahead


def in_turn(self, backend: str = "auto"):
    """:meth:`SpanPlan.materialize_ahead` on the caller's stream: the same kernels, no overlap."""
    k, v = self.materialize(backend=backend)
    done = torch.cuda.Event()
    done.record()
    return k, v, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    q = clustered(999) * 0.1
    extra = (clustered(5000, scale=2.0), clustered(5001))
    hist = History("qvg", 64)
    variants = {"one_stream": in_turn, "side_stream": REAL_AHEAD}
    rows, done = [], 0
    for chunks in (8, 16, 32, 64):
        while done < chunks:
            hist.append(clustered(2 * done, scale=2.0), clustered(2 * done + 1))
            done += 1
        row, outs = {"history_chunks": chunks}, {}
        for order in (0, 1):
            row[f"bf16_sdpa_ms_{order}"] = timed(lambda: hist.bf16(q, extra), reps=9)
            for name in (variants if order == 0 else reversed(list(variants))):
                SpanPlan.materialize_ahead = variants[name]
                try:
                    if order == 0:
                        outs[name] = hist.attend(q, extra, "staged")
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        hist.attend(q, extra, "staged")
                        torch.cuda.synchronize()
                        row[f"{name}_peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                    row[f"{name}_ms_{order}"] = timed(lambda: hist.attend(q, extra, "staged"), reps=9)
                finally:
                    SpanPlan.materialize_ahead = REAL_AHEAD
        row["max_abs_diff"] = (outs["one_stream"].float() - outs["side_stream"].float()).abs().max().item()
        for name in ("bf16_sdpa", *variants):
            row[f"{name}_ms"] = min(row[f"{name}_ms_0"], row[f"{name}_ms_1"])
        for name in variants:
            row[f"{name}_vs_bf16_sdpa"] = row[f"{name}_ms"] / row["bf16_sdpa_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_json(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
