"""What an AnyFlow-FAR cache-prefill computes, upstream's full re-encoding against qkv's incremental
one, counted (no model is run).

At the benchmark's sizes (``bench_pipelines.py --clients anyflow_far``: Wan2.1-1.3B patches,
480 x 832 video, chunk partition 1 + 3 x (chunks - 1), ``full_chunk_limit`` 3), for the last
prefill of a rollout of ``chunks`` chunks (its context: the ``chunks - 1`` chunks before the last):
the tokens that go through the blocks (their linear layers and per-token activations) and the
(query, key) pairs the chunk-causal attention scores. The full re-encoding runs every chunk of
the context, each attending to itself and the chunks before it; the incremental one runs only
the chunk just demoted to the coarse patch size and the full-resolution chunks, each attending
to the cached coarse context and the chunks before it
(``qkv.adapters.anyflow_far.context_tokens`` gives the tokens per chunk).

    PYTHONPATH=. python3 benchmarks/anyflow_prefill_work.py --out benchmarks/results/anyflow_prefill_work.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib

from anyflow_mask_memory import CONFIG, LAT_H, LAT_W, LIMIT

from qkv.caches.adapters.anyflow_far import context_tokens


def work(chunks: int) -> dict:
    tokens, n_coarse = context_tokens(CONFIG, [1] + [3] * (chunks - 2), LAT_H, LAT_W)
    ends = list(itertools.accumulate(tokens))
    kept = max(0, n_coarse - 1)  # the first chunk through the blocks: all coarse ones before it are cached
    return {"chunks": chunks, "context_tokens": ends[-1],
            "tokens_through_blocks": {"full": ends[-1], "incremental": ends[-1] - (ends[kept - 1] if kept else 0)},
            "attention_pairs": {"full": sum(t * e for t, e in zip(tokens, ends)),
                                "incremental": sum(t * e for t, e in zip(tokens[kept:], ends[kept:]))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [work(n) for n in args.chunks]
    for r in rows:
        t, p = r["tokens_through_blocks"], r["attention_pairs"]
        print(f"{r['chunks']} chunks: tokens {t['full']:,} / {t['incremental']:,} ({t['full'] / t['incremental']:.2f}x), "
              f"attention pairs {p['full'] / 1e6:,.1f} / {p['incremental'] / 1e6:,.1f} million "
              f"({p['full'] / p['incremental']:.2f}x)")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"latent": [LAT_H, LAT_W], "full_chunk_limit": LIMIT, "rows": rows},
                                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
