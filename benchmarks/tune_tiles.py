"""Find a kernel's tile on this GPU and (``--write``) record it in qkv's per-device table.

``--kernel decode`` (the default):

Sweeps :class:`qkv.kernels.triton.tiles.DecodeTile` (keys per tile, warps, pipelining depths,
keys per work item, waves; a register cap with ``--grid``)
over the cases of ``bench_decode.py`` (Llama-3-8B attention: 32 query
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

``--grid FIELD=V1,V2 ...`` replaces the decode sweep's choices of those fields (the others keep
theirs; the default tile is always timed too), for a narrower or a different grid, e.g.
``--grid warps=1,2 stages=1 maxnreg=none,128``. ``--keys centroids|codes|cast`` writes the winner for one
class of keys (``qkv.kernels.segments.key_class``: those that add centroids back, other codes,
spans stored as floats); ``--rescore JSON`` picks a winner from an
earlier sweep's timings of ``--policies`` without a GPU. The H200's one-query rows came so:

    PYTHONPATH=. python3 benchmarks/tune_tiles.py --cases 0 2 3 --policies qvg rtn kivi --grid warps=2,4 \
        block_n=64,128 waves=8,16 piece=512 stages=1 maxnreg=none,128,168 \
        --out benchmarks/results/tune_tiles_maxnreg_h200.json
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --rescore benchmarks/results/tune_tiles_maxnreg_h200.json \
        --policies qvg --up-to 16 --keys centroids --write --out benchmarks/results/tune_tiles_maxnreg_centroids_h200.json
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --rescore benchmarks/results/tune_tiles_maxnreg_h200.json \
        --policies rtn kivi --up-to 16 --keys codes --write --out benchmarks/results/tune_tiles_maxnreg_plain_h200.json

A row may also be for calls that read at most N span keys over their batch (``--reads-up-to N``,
the winner picked over such cases; ``--reads-above N`` picks the row for the others). The H100's
one-query qvg rows came so:

    PYTHONPATH=. python3 benchmarks/tune_tiles.py --cases 0 2 3 --policies qvg --grid warps=2,4 block_n=64,128 \
        waves=16 piece=512 stages=1 maxnreg=none,128 key_scores=none,0 \
        --out benchmarks/results/tune_tiles_key_scores_block_n_h100.json
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --rescore benchmarks/results/tune_tiles_key_scores_block_n_h100.json \
        --policies qvg --up-to 16 --keys centroids --reads-up-to 65536 --write \
        --out benchmarks/results/tune_tiles_key_scores_centroids_short_h100.json
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --rescore benchmarks/results/tune_tiles_key_scores_block_n_h100.json \
        --policies qvg --up-to 16 --keys centroids --reads-above 65536 --write \
        --out benchmarks/results/tune_tiles_key_scores_centroids_long_h100.json

``--kernel dequantize`` sweeps :class:`qkv.kernels.triton.tiles.DequantizeTile` (values per
program on the per-token fast path and on the others, warps) over the keys of ``SPANS``
(LongCat-Video's condition span, a Self-Forcing history; bf16) compressed by qvg, qvg-pro and rtn
(``--policies``), decompressed into a preallocated buffer, and writes one tile for any call:

    PYTHONPATH=. python3 benchmarks/tune_tiles.py --kernel dequantize \
        --out benchmarks/results/tune_tiles_dequantize_h200.json --write

``--kernel quantize`` sweeps :class:`qkv.kernels.triton.tiles.QuantizeTile` (values and warps
per program of quantize+pack, tiles a program of its settling pass) over the keys of ``SPANS`` as qvg and rtn
compress them (qvg's centroids subtracted on the way), and writes one tile for any call:

    PYTHONPATH=. python3 benchmarks/tune_tiles.py --kernel quantize \
        --out benchmarks/results/tune_tiles_quantize_h100.json --write

``--kernel assign`` sweeps :class:`qkv.kernels.triton.tiles.AssignTile` (tokens per program,
centroids per tile, warps, pipelining depth; and tiles that keep a row's centroids on chip, with
programs per multiprocessor) over ``ASSIGN_SHAPES`` (at most 256 clusters). Its rows are by the
call's clusters: the winner for up to 256 (``--up-to 256``), and the best tile that loops over
centroid tiles (``--tiled``) for any count (k-means||'s 512 candidates, more clusters). The
H100's rows came from one sweep, rescored twice:

    PYTHONPATH=. python3 benchmarks/tune_tiles.py --kernel assign \
        --out benchmarks/results/tune_tiles_assign_resident_h100.json
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --kernel assign --up-to 256 \
        --rescore benchmarks/results/tune_tiles_assign_resident_h100.json \
        --out benchmarks/results/tune_tiles_assign_up_to_256_h100.json --write
    PYTHONPATH=. python3 benchmarks/tune_tiles.py --kernel assign --tiled \
        --rescore benchmarks/results/tune_tiles_assign_resident_h100.json \
        --out benchmarks/results/tune_tiles_assign_tiled_h100.json --write

``--kernel decompress`` sweeps :class:`qkv.kernels.triton.tiles.DecompressTile` (keys per work
item and per tile, warps, K and V by one program or two) of the span decompression the staged attention runs (every span of a
plan in one launch) over ``DECOMPRESS_WINDOWS`` (qvg with 64 clusters, bf16) and writes one tile.

``--kernel update`` sweeps :class:`qkv.kernels.triton.tiles.UpdateTile` (tokens per step,
centroids per block, warps, waves) of the one-hot k-means update over ``UPDATE_SHAPES`` (the
shapes it is used for: at most 128 clusters; balanced random assignments) and writes one tile.
``--kernel assign_sums`` sweeps :class:`qkv.kernels.triton.tiles.AssignSumsTile` (tokens per
step, warps, waves) of the assignment pass that also sums (at most 32 clusters) over
``ASSIGN_SUMS_SHAPES`` and writes one tile.

``--kernel kmeanspp`` sweeps :class:`qkv.kernels.triton.tiles.SeedTile` (values per distance
chunk, warps) of the weighted D^2 sampling kernel over ``SEED_SHAPES`` (the seedings' draws at
256 clusters: k-means||'s from its candidates, k-means++'s from its subsample) and writes one tile.
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

import qkv
from qkv.grouping.kmeans import REDUCE_ROUNDS
from qkv.kernels import CompressedSpan, SpanPlan
from qkv.kernels.segments import KEY_CLASSES
from qkv.kernels.quantize import QuantizedRows
from qkv.kernels.triton import tiles
from qkv.kernels.triton.decode import decode_triton
from qkv.kernels.triton.decompress import decompress_spans_triton
from qkv.kernels.triton.kmeans.assign import assign_triton
from qkv.kernels.triton.kmeans.seeding import kmeanspp_triton
from qkv.kernels.triton.kmeans.sums import update_onehot
from qkv.kernels.triton.quantize import dequantize_triton, quantize_pack_triton

POLICIES = ("qvg", "kivi", "rtn", "quarot", "bf16")
CASES = ((1, 32 * 1024, 1), (1, 32 * 1024, 16), (1, 128 * 1024, 1), (8, 32 * 1024, 1), (8, 32 * 1024, 16))
# the dequantize kernel's spans: LongCat-Video's condition span and a Self-Forcing history
SPANS = {"longcat_video": (1, 32, 29640, 128), "self_forcing": (1, 12, 37440, 128)}
DEQUANTIZE_POLICIES = ("qvg", "qvg-pro", "rtn")
QUANTIZE_POLICIES = ("qvg", "rtn")
# the assignment's (rows, tokens, head dim, clusters): LongCat-Video's span, a Self-Forcing
# history, a SANA-WM compression pass (8 blocks x 2 x 32 heads of 2,640 tokens)
ASSIGN_SHAPES = {"longcat_video": (32, 29640, 128, 256), "self_forcing": (12, 37440, 128, 256),
                 "sana_wm_pass": (512, 2640, 128, 64)}
# the span decompression's windows: (batch, KV heads, tokens per span, spans, head dim): a SANA-WM
# window (4 spans of one 3-frame block each) and a Self-Forcing history (8 one-chunk spans)
DECOMPRESS_WINDOWS = {"sana_wm_window": (1, 32, 2640, 4, 128), "self_forcing_history": (1, 12, 4680, 8, 128)}
# the one-hot update's (rows, tokens, head dim, clusters): a SANA-WM pass, a Self-Forcing history
# at 64 and 128 clusters
UPDATE_SHAPES = {"sana_wm_pass": (512, 2640, 128, 64), "self_forcing_64": (12, 37440, 128, 64),
                 "self_forcing_128": (12, 37440, 128, 128)}
# the assignment that also sums (at most FUSED_MAX_CLUSTERS clusters): (rows, tokens, head dim,
# clusters) of a SANA-WM pass at 16 and 32 clusters, a Self-Forcing chunk's K and V and a LongCat-Video span
ASSIGN_SUMS_SHAPES = {"sana_wm_pass_16": (512, 2640, 128, 16), "sana_wm_pass_32": (512, 2640, 128, 32),
                      "self_forcing_chunk_16": (24, 4680, 128, 16), "longcat_video_16": (32, 29640, 128, 16)}

# weighted D^2 sampling's (rows, points, head dim, picks): k-means||'s 4 x 256 candidates of a
# LongCat-Video span's K and V, and k-means++'s 16 x 256 subsample of a Self-Forcing history
SEED_SHAPES = {"kmeans||_longcat_video": (64, 1024, 128, 256), "kmeans++_self_forcing": (12, 4096, 128, 256)}


def planned(segments: list) -> list:
    """``segments`` with the compressed spans in one plan (as ``KVCache.attend`` passes them: the
    span table is built on the first call, not in the timed ones)."""
    spans = [s for s in segments if isinstance(s, CompressedSpan)]
    return [SpanPlan(spans), *(s for s in segments if not isinstance(s, CompressedSpan))]


# the decode sweep's choices per DecodeTile field (--quick narrows them, --grid replaces any)
DECODE_CHOICES = {"block_n": (32, 64, 128), "warps": (4, 8), "stages": ((1,), (2, 1)), "piece": (256, 512),
                  "waves": (2, 4, 8), "maxnreg": (None,), "key_scores": (None,)}
DECODE_QUICK = {"block_n": (64, 128), "stages": ((2, 1),), "piece": (256,), "waves": (4, 8)}


# DecodeTile fields that take None (written ``none``): no register cap, no key scores
NONE_FIELDS = ("maxnreg", "key_scores")


def grid_choices(items: list[str]) -> dict[str, tuple]:
    """``--grid FIELD=V1,V2`` items as DecodeTile choices: integers, pipelining depths written
    ``2:1``, and ``none`` for a NONE_FIELDS field."""
    def value(field: str, text: str):
        if field in NONE_FIELDS and text == "none":
            return None
        try:
            return tuple(int(x) for x in text.split(":")) if field == "stages" else int(text)
        except ValueError:
            raise SystemExit(f"--grid {field} takes whole numbers{' (or none)' * (field in NONE_FIELDS)}, "
                             f"not {text!r}") from None

    out = {}
    for item in items:
        field, _, values = item.partition("=")
        if field not in DECODE_CHOICES or not values:
            raise SystemExit(f"--grid takes FIELD=V1,V2 with FIELD one of {', '.join(DECODE_CHOICES)}: got {item!r}")
        out[field] = tuple(value(field, v) for v in values.split(","))
    return out


def decode_grid(quick: bool, grid: dict[str, tuple] | None = None) -> list[tiles.DecodeTile]:
    choices = {**DECODE_CHOICES, **(DECODE_QUICK if quick else {}), **(grid or {})}
    tiles_ = [tiles.DecodeTile(**dict(zip(choices, combo))) for combo in itertools.product(*choices.values())]
    return [t for t in tiles_ if t.piece % t.block_n == 0]


def dequantize_grid(quick: bool) -> list[tiles.DequantizeTile]:
    fast, other, warps = (2048, 4096, 8192, 16384), (4096, 8192, 16384), (2, 4, 8)
    if quick:
        fast, other, warps = (4096, 8192), (8192,), (4, 8)
    return [tiles.DequantizeTile(f, v, w) for f, v, w in itertools.product(fast, other, warps)]


def added_stages(ct) -> tuple[list, list]:
    """The centroids and assignments, rows flattened, of the stages of ``ct`` that add centroids
    back (what the quantize and dequantize kernels take)."""
    added = [i for i, st in enumerate(ct.stages) if st.centroids is not None]
    return [ct.stages[i].centroids.flatten(0, 1) for i in added], [ct.stage_assignments(i) for i in added]


def quantize_grid(quick: bool) -> list[tiles.QuantizeTile]:
    values, warps, settle = (2048, 4096, 8192, 16384), (2, 4, 8), (2, 8, 32)
    if quick:
        values, warps, settle = (4096, 8192), (4, 8), (8, 32)
    return [tiles.QuantizeTile(v, w, t) for v, w, t in itertools.product(values, warps, settle)]


def quantize_calls(args):
    """(case, call(tile)) of quantize+pack (both its passes) as a compression launches
    it: the keys of SPANS with each policy's stage centroids subtracted on the way (qvg's), or
    none (rtn's)."""
    for name, shape in SPANS.items():
        x = (torch.randn(shape, device="cuda") + torch.randn(1, shape[1], 1, shape[3], device="cuda")).bfloat16()
        rows = x.flatten(0, 1)
        for policy in args.policies or QUANTIZE_POLICIES:
            ct = qkv.build_policy(policy).k.compress(x)
            centroids, assignments = added_stages(ct)
            yield (name, policy), lambda tile: quantize_pack_triton(rows, ct.format.codes, centroids, assignments,
                                                                    tile=tile)
            del ct, centroids, assignments
        del x, rows
        torch.cuda.empty_cache()


def decode_calls(args):
    """(case, call(tile)) of the decode kernel over CASES x policies."""
    for batch, tokens, sq in [CASES[i] for i in args.cases] if args.cases else CASES:
        k, v = history(batch, tokens)
        q = (torch.randn(batch, HEADS, sq, HEAD_DIM, device="cuda") * 0.5).bfloat16()
        for policy in args.policies or POLICIES:
            cache = build(policy, k, v)
            segments = planned(cache.layer(0).segments())
            yield (batch, tokens, sq, policy), lambda tile: decode_triton(q, segments, tile=tile)
            del cache, segments
        del k, v
        torch.cuda.empty_cache()


def dequantize_calls(args):
    """(case, call(tile)) of the dequantize kernel: the keys of SPANS compressed by each policy,
    decompressed into a preallocated buffer (what ``qkv.kernels.decompress`` launches)."""
    for name, shape in SPANS.items():
        x = (torch.randn(shape, device="cuda") + torch.randn(1, shape[1], 1, shape[3], device="cuda")).bfloat16()
        for policy in args.policies or DEQUANTIZE_POLICIES:
            ct = qkv.build_policy(policy).k.compress(x)
            rows = QuantizedRows(*(None if t is None else t.flatten(0, 1) for t in (ct.codes, ct.scales, ct.zeros,
                                                                                    ct.scale_mult)))
            centroids, assignments = added_stages(ct)
            out = torch.empty(rows.codes.shape[0], ct.quantized_tokens, shape[3], dtype=ct.dtype, device="cuda")
            yield (name, policy), lambda tile: dequantize_triton(
                rows, ct.format.codes, ct.quantized_tokens, centroids, assignments, out_dtype=ct.dtype, out=out,
                tile=tile)
            del ct, rows, centroids, assignments, out
        del x
        torch.cuda.empty_cache()


def assign_grid(quick: bool) -> list[tiles.AssignTile]:
    tokens, clusters, warps, stages = (64, 128, 256), (32, 64, 128, 256), (4, 8), (3,)
    resident, waves = (32, 64, 128), (1, 2)
    if quick:
        tokens, clusters, warps, stages, resident, waves = (128, 256), (64,), (8,), (3,), (64,), (2,)
    # a program's products, [tokens, clusters] fp32, beyond 16,384 values would spill
    tiled = [tiles.AssignTile(t, c, w, n) for t, c, w, n in itertools.product(tokens, clusters, warps, stages)
             if t * c <= 16384]
    # every centroid (up to 256) kept on chip, a program walking token tiles
    return tiled + [tiles.AssignTile(t, 256, w, n, v)
                    for t, w, n, v in itertools.product(resident, warps, (2, 3) if not quick else stages, waves)]


def assign_calls(args):
    """(case, call(tile)) of the k-means assignment kernel over ASSIGN_SHAPES as k-means calls it:
    bf16 tokens gathered around the centroids, the row factor 1 (every row in the safe range has
    it, and the on-chip kernel pipelines only the loop of such rows)."""
    for name, (rows, tokens, d, clusters) in ASSIGN_SHAPES.items():
        cents = torch.randn(rows, clusters, d, device="cuda")
        near = torch.randint(0, clusters, (tokens,), device="cuda")
        x = (cents[:, near] + 0.3 * torch.randn(rows, tokens, d, device="cuda")).bfloat16()
        factor = torch.ones(rows, device="cuda")
        yield (name,), lambda tile: assign_triton(x, cents, factor, tile=tile)
        del x, cents, near
        torch.cuda.empty_cache()


def decompress_grid(quick: bool) -> list[tiles.DecompressTile]:
    pieces, blocks, warps, split = (64, 128, 256, 512), (16, 32, 64), (2, 4, 8), (False, True)
    if quick:
        pieces, blocks, warps = (64, 128, 256), (16, 32), (4,)
    return [tiles.DecompressTile(p, n, w, s) for p, n, w, s in itertools.product(pieces, blocks, warps, split) if n <= p]


def decompress_calls(args):
    """(case, call(tile)) of the span decompression over DECOMPRESS_WINDOWS (qvg, 64 clusters)."""
    policy = qkv.build_policy("qvg", clusters=64)
    for name, (b, h, tokens, spans, d) in DECOMPRESS_WINDOWS.items():
        plan = SpanPlan([CompressedSpan(policy.compress(
            *(torch.randn(b, h, tokens, d, device="cuda").bfloat16() for _ in range(2)))) for _ in range(spans)])
        k, v = (torch.empty(b, h, plan.tokens, d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        yield (name,), lambda tile: decompress_spans_triton(plan, k, v, tile=tile)
        del plan, k, v
        torch.cuda.empty_cache()


def update_grid(quick: bool) -> list[tiles.UpdateTile]:
    tokens, clusters, warps, waves = (32, 64, 128), (32, 64, 128), (4, 8), (2, 4, 8)
    if quick:
        tokens, clusters, warps, waves = (64,), (64,), (4, 8), (4,)
    return [tiles.UpdateTile(t, c, w, v) for t, c, w, v in itertools.product(tokens, clusters, warps, waves)]


def assign_sums_grid(quick: bool) -> list[tiles.AssignSumsTile]:
    tokens, warps, waves = (32, 64, 128), (4, 8), (2, 4, 8)
    if quick:
        tokens, warps, waves = (32, 64), (4,), (2, 4)
    return [tiles.AssignSumsTile(t, w, v) for t, w, v in itertools.product(tokens, warps, waves)]


def assign_sums_calls(args):
    """(case, call(tile)) of the assignment that also sums, over ASSIGN_SUMS_SHAPES as k-means calls
    it (bf16 tokens gathered around the centroids, a row factor)."""
    for name, (rows, tokens, d, clusters) in ASSIGN_SUMS_SHAPES.items():
        cents = torch.randn(rows, clusters, d, device="cuda")
        near = torch.randint(0, clusters, (tokens,), device="cuda")
        x = (cents[:, near] + 0.3 * torch.randn(rows, tokens, d, device="cuda")).bfloat16()
        factor = torch.full((rows,), 0.5, device="cuda")
        yield (name,), lambda tile: assign_triton(x, cents, factor, sums=True, sum_tile=tile)
        del x, cents, near
        torch.cuda.empty_cache()


def update_calls(args):
    """(case, call(tile)) of the one-hot k-means update over UPDATE_SHAPES (bf16 tokens)."""
    for name, (rows, tokens, d, clusters) in UPDATE_SHAPES.items():
        x = torch.randn(rows, tokens, d, device="cuda").bfloat16()
        assign = torch.randint(0, clusters, (rows, tokens), device="cuda")
        old = torch.randn(rows, clusters, d, device="cuda")
        yield (name,), lambda tile: update_onehot(x, assign, old, tile=tile)
        del x, assign, old
        torch.cuda.empty_cache()


def kmeanspp_grid(quick: bool) -> list[tiles.SeedTile]:
    values, warps = (4096, 8192, 16384, 32768), (4, 8, 16)
    if quick:
        values, warps = (4096, 8192), (8, 16)
    return [tiles.SeedTile(v, w) for v, w in itertools.product(values, warps)]


def kmeanspp_calls(args):
    """(case, call(tile)) of weighted D^2 sampling over SEED_SHAPES (random bf16 points, as the
    seedings pass bf16 tokens; unit weights) in the rounds each seeding draws in: k-means||'s
    reduction in 1 + REDUCE_ROUNDS, k-means++ a pick a round."""
    for name, (rows, points, d, picks) in SEED_SHAPES.items():
        x = torch.randn(rows, points, d, device="cuda").bfloat16()
        weights = torch.ones(rows, points, device="cuda")
        rounds = 1 + min(picks - 1, REDUCE_ROUNDS) if name.startswith("kmeans||") else picks
        draws = torch.empty(rounds, points, device="cuda").exponential_().clamp_min_(1e-30)
        yield (name,), lambda tile: kmeanspp_triton(x, weights, draws, picks, tile=tile)
        del x, weights, draws
        torch.cuda.empty_cache()


KERNELS = {"decode": (decode_grid, decode_calls), "dequantize": (dequantize_grid, dequantize_calls),
           "quantize": (quantize_grid, quantize_calls),
           "assign": (assign_grid, assign_calls), "update": (update_grid, update_calls),
           "assign_sums": (assign_sums_grid, assign_sums_calls),
           "decompress": (decompress_grid, decompress_calls), "kmeanspp": (kmeanspp_grid, kmeanspp_calls)}


def measure(args) -> tuple[list, dict[tuple, list[float]], dict]:
    """Time every candidate tile on every case of this GPU: (candidates, times by case, environment)."""
    make_grid, calls = KERNELS[args.kernel]
    candidates = decode_grid(args.quick, grid_choices(args.grid)) if args.grid else make_grid(args.quick)
    default = tiles.DEFAULTS[args.kernel]
    if default not in candidates:
        candidates.append(default)
    times: dict[tuple, list[float]] = {}
    for case, call in calls(args):
        times[case] = []
        for tile in candidates:
            try:
                t = graph_timed(lambda: call(tile))
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                print(f"{case} {tile}: {type(exc).__name__}", flush=True)
                t = math.inf
            times[case].append(t)
        best = min(range(len(candidates)), key=lambda i: times[case][i])
        print(json.dumps({"case": case, "best_ms": times[case][best], "best": dataclasses.asdict(candidates[best]),
                          "default_ms": times[case][candidates.index(default)]}), flush=True)
    return candidates, times, environment()


def rescore(args) -> tuple[list, dict[tuple, list[float]], dict]:
    """An earlier sweep's (``--rescore``) candidates, times of the cases of ``--policies`` (a
    case's last field) and ``--shapes`` (its first) and environment: a winner for a subset of its
    cases without a GPU."""
    earlier = json.loads(pathlib.Path(args.rescore).read_text())
    if earlier["kernel"] != args.kernel:
        raise SystemExit(f"--rescore {args.rescore} is a {earlier['kernel']} sweep, not {args.kernel}")
    kind = type(tiles.DEFAULTS[args.kernel])
    fields = {f.name for f in dataclasses.fields(kind)}
    # a tile that set an option qkv no longer has is left out; one that left it off is kept
    kept = [i for i, t in enumerate(earlier["tiles"]) if not any(v for k, v in t.items() if k not in fields)]
    candidates = [kind(**{k: v for k, v in earlier["tiles"][i].items() if k in fields}) for i in kept]
    times = {tuple(c["case"]): [c["ms"][i] for i in kept] for c in earlier["cases"]
             if (args.policies is None or c["case"][-1] in args.policies)
             and (args.shapes is None or c["case"][0] in args.shapes)}
    if not times:
        raise SystemExit(f"--rescore {args.rescore} has no case of the policies {args.policies} "
                         f"and shapes {args.shapes}")
    return candidates, times, earlier["environment"]


def reads_in(case: tuple, up_to: int | None, above: int | None) -> bool:
    """Whether a decode case ([batch, history, queries, policy]) reads at most ``up_to`` and more
    than ``above`` span keys over its batch (None: no bound); other kernels' cases always."""
    if up_to is None and above is None:
        return True
    reads = case[0] * case[1]
    return (up_to is None or reads <= up_to) and (above is None or reads > above)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=tuple(KERNELS), default="decode")
    parser.add_argument("--out", required=True)
    parser.add_argument("--write", nargs="?", const=str(tiles.TABLE), default=None, metavar="TABLE",
                        help="store the winner in this table (default qkv/kernels/triton/tiles.json)")
    parser.add_argument("--up-to", type=int, default=None,
                        help="write the winner for calls of at most this many query rows per KV head (decode) "
                             "or clusters (assign_sums)")
    parser.add_argument("--keys", choices=KEY_CLASSES, default=None,
                        help="decode: write the winner for this class of keys (qkv.kernels.segments.key_class); "
                             "omitted: for every class")
    parser.add_argument("--reads-up-to", type=int, default=None,
                        help="decode: pick over the cases that read at most this many span keys (batch x history) "
                             "and write the winner for such calls")
    parser.add_argument("--reads-above", type=int, default=None,
                        help="decode: pick over the cases that read more than this many span keys")
    parser.add_argument("--cases", type=int, nargs="+", default=None, help="indices into CASES (decode; default all)")
    parser.add_argument("--quick", action="store_true", help="a small grid (a smoke run)")
    parser.add_argument("--policies", nargs="+", default=None)
    parser.add_argument("--shapes", nargs="+", default=None, help="with --rescore: only these cases (by first field)")
    parser.add_argument("--grid", nargs="+", default=[], metavar="FIELD=V1,V2",
                        help="decode: replace the choices of DecodeTile fields (stages as 2:1), e.g. warps=1,2")
    parser.add_argument("--tiled", action="store_true",
                        help="assign: pick among the tiles that loop over centroid tiles (waves 0): the row "
                             "for calls whose clusters no tile keeps on chip")
    parser.add_argument("--rescore", metavar="JSON",
                        help="pick the winner from this earlier sweep's timings of --policies instead of timing "
                             "(no GPU needed; the table row goes under the GPU that sweep ran on)")
    args = parser.parse_args()
    if args.grid and args.kernel != "decode":
        raise SystemExit("--grid is for the decode sweep")
    if args.keys and args.kernel != "decode":
        raise SystemExit("--keys is for the decode table")
    if args.tiled and args.kernel != "assign":
        raise SystemExit("--tiled is for the assignment sweep")
    if (args.reads_up_to is not None or args.reads_above is not None) and args.kernel != "decode":
        raise SystemExit("--reads-up-to and --reads-above are for the decode table")
    candidates, times, env = rescore(args) if args.rescore else measure(args)
    if args.tiled:
        keep = [i for i, c in enumerate(candidates) if not c.waves]
        candidates, times = [candidates[i] for i in keep], {case: [t[i] for i in keep] for case, t in times.items()}
    times = {case: t for case, t in times.items() if reads_in(case, args.reads_up_to, args.reads_above)}
    if not times:
        raise SystemExit(f"no case reads at most {args.reads_up_to} and more than {args.reads_above} span keys")
    default = tiles.DEFAULTS[args.kernel]
    at_default = candidates.index(default) if default in candidates else None
    ratios = [sum(t[i] / min(t) for t in times.values()) / len(times) for i in range(len(candidates))]
    win = min(range(len(candidates)), key=ratios.__getitem__)
    result = {
        "environment": env,
        "kernel": args.kernel,
        **({"rescored_from": pathlib.Path(args.rescore).name} if args.rescore else {}),
        "cases": [{"case": list(case), "ms": t} for case, t in times.items()],
        "tiles": [dataclasses.asdict(c) for c in candidates],
        "mean_ratio_to_best": ratios,
        "winner": dataclasses.asdict(candidates[win]),
        "winner_ms": {",".join(map(str, case)): t[win] for case, t in times.items()},
        "default_ms": {",".join(map(str, case)): None if at_default is None else t[at_default]
                       for case, t in times.items()},
    }
    print(json.dumps({"winner": result["winner"], "mean_ratio": ratios[win],
                      "default_mean_ratio": None if at_default is None else ratios[at_default]}), flush=True)
    write_json(args.out, result)
    if args.write:
        path = pathlib.Path(args.write)
        table = json.loads(path.read_text()) if path.exists() else {}
        gpu = table.setdefault(env["gpu"], {})
        bounds = {"up_to": args.up_to, **({"keys": args.keys} if args.keys else {}),
                  **({"reads_up_to": args.reads_up_to} if args.reads_up_to is not None else {})}
        entries = [e for e in gpu.get(args.kernel, []) if [e.get(f) for f in tiles.TABLE_BOUNDS]
                   != [bounds.get(f) for f in tiles.TABLE_BOUNDS]]
        entries.append({**bounds, **result["winner"]})
        gpu[args.kernel] = sorted(entries, key=lambda e: (math.inf if e["up_to"] is None else e["up_to"],
                                                          e.get("keys") is None,
                                                          math.inf if e.get("reads_up_to") is None else e["reads_up_to"]))
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
