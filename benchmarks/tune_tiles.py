"""Find the decode kernel's tile on this GPU and (``--write``) record it in qkv's per-device table.

Sweeps :class:`qkv.kernels.triton.tiles.DecodeTile` (keys per tile, warps, pipelining depths,
keys per work item, waves) over the cases of ``bench_decode.py`` (Llama-3-8B attention: 32 query
heads, 8 KV heads x 128; batch 1 at 32k and 128k, batch 8 at 32k; 1 and 16 queries) for the
policies qvg, kivi, rtn, quarot and bf16 spans, timing each call replayed from a CUDA graph.
Each case's times are divided by that case's best, and the tile with the lowest mean ratio wins;
``--write`` stores it under the GPU's name in ``qkv/kernels/triton/tiles.json`` as the tile for
calls of at most ``--up-to`` query rows per KV head (query heads per KV head x queries; omitted:
any other call). The JSON result lists every tile's times, the winner and the default's. The
table shipped for the H200 came from two runs, one per row class (4 rows: one query; 64 rows:
sixteen):

    PYTHONPATH=. python3 benchmarks/tune_tiles.py --cases 0 3 --policies qvg kivi rtn --up-to 16 \
        --out benchmarks/results/tune_tiles_h200.json --write
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --cases 1 4 --policies qvg kivi rtn \
        --out benchmarks/results/tune_tiles_many_rows_h200.json --write
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import pathlib

import torch
from bench_decode import HEADS, HEAD_DIM, build, graph_timed, history
from common import environment, write_json

from qkv.kernels import CompressedSpan, SpanPlan
from qkv.kernels.triton import tiles
from qkv.kernels.triton.decode import decode_triton

POLICIES = ("qvg", "kivi", "rtn", "quarot", "bf16")
CASES = ((1, 32 * 1024, 1), (1, 32 * 1024, 16), (1, 128 * 1024, 1), (8, 32 * 1024, 1), (8, 32 * 1024, 16))


def planned(segments: list) -> list:
    """``segments`` with the compressed spans in one plan (as ``KVCache.attend`` passes them: the
    span table is built on the first call, not in the timed ones)."""
    spans = [s for s in segments if isinstance(s, CompressedSpan)]
    return [SpanPlan(spans), *(s for s in segments if not isinstance(s, CompressedSpan))]


def grid(quick: bool) -> list[tiles.DecodeTile]:
    compiled = itertools.product((32, 64, 128), (4, 8), ((1,), (2, 1)))
    launch = itertools.product((256, 512), (2, 4, 8))
    if quick:
        compiled = itertools.product((64, 128), (4, 8), ((2, 1),))
        launch = itertools.product((256,), (4, 8))
    launch = list(launch)
    return [
        tiles.DecodeTile(block_n=n, piece=piece, warps=w, stages=st, waves=waves)
        for (n, w, st), (piece, waves) in itertools.product(compiled, launch)
        if piece % n == 0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--write", nargs="?", const=str(tiles.TABLE), default=None, metavar="TABLE",
                        help="store the winner in this table (default qkv/kernels/triton/tiles.json)")
    parser.add_argument("--up-to", type=int, default=None,
                        help="write the winner for calls of at most this many query rows per KV head")
    parser.add_argument("--cases", type=int, nargs="+", default=None, help="indices into CASES (default all)")
    parser.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    parser.add_argument("--policies", nargs="+", default=POLICIES)
    args = parser.parse_args()
    candidates = grid(args.quick)
    default = tiles.DEFAULTS["decode"]
    if default not in candidates:
        candidates.append(default)
    times: dict[tuple, list[float]] = {}
    for batch, tokens, sq in [CASES[i] for i in args.cases] if args.cases else CASES:
        k, v = history(batch, tokens)
        q = (torch.randn(batch, HEADS, sq, HEAD_DIM, device="cuda") * 0.5).bfloat16()
        for policy in args.policies:
            cache = build(policy, k, v)
            segments = planned(cache.layer(0).segments())
            case = (batch, tokens, sq, policy)
            times[case] = []
            for tile in candidates:
                try:
                    t = graph_timed(lambda: decode_triton(q, segments, tile=tile))
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                    print(f"{case} {tile}: {type(exc).__name__}", flush=True)
                    t = math.inf
                times[case].append(t)
            best = min(range(len(candidates)), key=lambda i: times[case][i])
            print(json.dumps({"case": case, "best_ms": times[case][best], "best": dataclasses.asdict(candidates[best]),
                              "default_ms": times[case][candidates.index(default)]}), flush=True)
            del cache, segments
        del k, v
        torch.cuda.empty_cache()
    ratios = [sum(t[i] / min(t) for t in times.values()) / len(times) for i in range(len(candidates))]
    win = min(range(len(candidates)), key=ratios.__getitem__)
    result = {
        "cases": [{"batch": b, "history": s, "queries": sq, "policy": p, "ms": t} for (b, s, sq, p), t in times.items()],
        "tiles": [dataclasses.asdict(c) for c in candidates],
        "mean_ratio_to_best": ratios,
        "winner": dataclasses.asdict(candidates[win]),
        "winner_ms": {f"{b},{s},{sq},{p}": t[win] for (b, s, sq, p), t in times.items()},
        "default_ms": {f"{b},{s},{sq},{p}": t[candidates.index(default)] for (b, s, sq, p), t in times.items()},
    }
    print(json.dumps({"winner": result["winner"], "mean_ratio": ratios[win],
                      "default_mean_ratio": ratios[candidates.index(default)]}), flush=True)
    write_json(args.out, result)
    if args.write:
        path = pathlib.Path(args.write)
        table = json.loads(path.read_text()) if path.exists() else {}
        entries = [e for e in table.setdefault(environment()["gpu"], {}).get("decode", []) if e["up_to"] != args.up_to]
        entries.append({"up_to": args.up_to, **result["winner"]})
        table[environment()["gpu"]]["decode"] = sorted(entries, key=lambda e: math.inf if e["up_to"] is None else e["up_to"])
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
