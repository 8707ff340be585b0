"""Warm-started vs cold k-means on consecutive spans of real K/V: iterations to the same error.

A streaming cache compresses span after span of one layer/head/tensor. A cold start seeds every
span's k-means afresh (k-means++ on a subsample, or the reference's uniform random tokens); a warm
start seeds span s with the centroids the cache kept for span s-1. This measures, per
(layer, tensor, head) row and per span s >= 1:

    w(n) = the fewest warm iterations whose objective (sum of squared distances to the nearest
           centroid) is <= the objective a cold k-means++ start reaches after n iterations,

for n = 2, 5, 10, 20. The warm chain is what the cache does: span s-1 was itself warm-started and ran
``--chain-iters`` iterations (the qvg preset's 5 by default; ``kmeans(warm_iters=n)`` runs n), and
``chain_rel`` is what the cache stores for span s: its objective after that many warm iterations. All runs use tol=0 (no early stop), so every curve has
every iteration. C = 256 clusters (QVG). Cold starts: k-means++ (the kmeans default) and uniform
random tokens (the reference's seeding, and the qvg presets' ``init=random``).

Data (``qkv.realdata``): ``wan`` (a Wan2.1-1.3B-shaped DiT with RANDOM weights over real video
frames; K before RoPE; spans of one Self-Forcing chunk = 3 latent frames = 4,680 tokens, the first
5 spans, 6 of 12 heads)
and ``whisper-encoder`` (Whisper tiny.en, real weights, real synthesized speech; spans of one 30 s
window = 1,500 tokens, the first 10 spans, all 6 heads). Sizes are cut to fit ~5 CPU minutes
(one thread: OMP_NUM_THREADS=1); ``--quick`` cuts further (stated in the output and JSON).

    python benchmarks/warm_start_kmeans.py            # writes benchmarks/results/warm_start_kmeans.json
    python benchmarks/warm_start_kmeans.py --chain-iters 2   # ... warm_start_kmeans_chain2.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from qkv.grouping.kmeans import kmeans
from qkv.realdata import load_dataset

CLUSTERS = 256
CHAIN_ITERS = 5  # what the cache runs per span (qvg preset)
MAX_ITERS = 20
TARGETS = (2, 5, 10, 20)
REPORT_ITERS = (0, 2, 5, 10, 20)
# dataset -> (tokens per span, spans used, heads used)
SETUPS = {"wan": (4_680, 5, 6), "whisper-encoder": (1_500, 10, 6)}
QUICK = {"wan": (4_680, 2, 2), "whisper-encoder": (1_500, 2, 6)}
OUT = pathlib.Path(__file__).resolve().parent / "results" / "warm_start_kmeans.json"


def full_curve(objective: torch.Tensor, iters: int) -> torch.Tensor:
    """Objective history [iters + 1, N]: k-means stops once every row is at a fixed point (no
    change at all with tol=0), so a shorter history is padded with its last value."""
    if objective.shape[0] < iters + 1:
        pad = objective[-1:].expand(iters + 1 - objective.shape[0], -1)
        objective = torch.cat([objective, pad])
    return objective


def run(xs: torch.Tensor, iters: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, objective curve [iters + 1, N]) of k-means with C = CLUSTERS and tol = 0."""
    result = kmeans(xs, CLUSTERS, iters, tol=0, **kw)
    return result.centroids, full_curve(result.objective, iters)


def first_reaching(curve: torch.Tensor, target: torch.Tensor) -> list[int | None]:
    """Per row, the first iteration i with curve[i] <= target (None if none): curve [I+1, N]."""
    hit = curve <= target.unsqueeze(0) * (1 + 1e-9)
    out = []
    for row in range(curve.shape[1]):
        idx = torch.nonzero(hit[:, row])
        out.append(int(idx[0]) if len(idx) else None)
    return out


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def measure(dataset: str, span: int, spans: int, heads: int, chain_iters: int) -> dict:
    samples = load_dataset(dataset, progress=False)
    rows = []  # one dict per (layer, tensor, span >= 1, head)
    sec = {"init": 0.0, "inits": 0, "cold": 0.0, "cold_iters": 0, "warm": 0.0, "warm_iters": 0}
    for sample in samples:
        for name, t in (("k", sample.k), ("v", sample.v)):
            x = t[0, :heads, : span * spans].float()  # [N, S, D]
            chain = run(x[:, :span].contiguous(), CHAIN_ITERS, init="random")[0]  # the first span: cold, as qvg
            for s in range(1, spans):
                xs = x[:, s * span : (s + 1) * span].contiguous()
                t0 = time.perf_counter()
                run(xs, 0)  # k-means++ init alone
                t1 = time.perf_counter()
                _, cold = run(xs, MAX_ITERS)
                t2 = time.perf_counter()
                _, warm = run(xs, MAX_ITERS, init_centroids=chain)
                t3 = time.perf_counter()
                _, rand = run(xs, MAX_ITERS, init="random")
                sec["init"] += t1 - t0
                sec["inits"] += 1
                sec["cold"] += (t2 - t1) - (t1 - t0)
                sec["cold_iters"] += MAX_ITERS
                sec["warm"] += t3 - t2
                sec["warm_iters"] += MAX_ITERS
                energy = (xs.double() - xs.double().mean(1, keepdim=True)).square().sum((1, 2))  # [N]
                hits = {n: first_reaching(warm, cold[n]) for n in TARGETS}
                hits_random = {n: first_reaching(warm, rand[n]) for n in TARGETS}
                for h in range(xs.shape[0]):
                    rows.append(
                        {
                            "layer": sample.layer,
                            "tensor": name,
                            "span": s,
                            "head": h,
                            "warm_iters_to_cold": {str(n): hits[n][h] for n in TARGETS},
                            "warm_iters_to_random": {str(n): hits_random[n][h] for n in TARGETS},
                            # objective / total variance of the span: a relative clustering error
                            "cold_rel": [round(float(cold[i, h] / energy[h]), 7) for i in REPORT_ITERS],
                            "warm_rel": [round(float(warm[i, h] / energy[h]), 7) for i in REPORT_ITERS],
                            "random_rel": [round(float(rand[i, h] / energy[h]), 7) for i in REPORT_ITERS],
                            "chain_rel": round(float(warm[chain_iters, h] / energy[h]), 7),
                        }
                    )
                # the chain continues as the cache would: chain_iters warm iterations
                chain = run(xs, chain_iters, init_centroids=chain)[0]
    label = samples[0].label.split(" L0")[0]
    return {"dataset": dataset, "label": label, "tokens_per_span": span, "spans": spans, "heads": heads,
            "rows": rows, "seconds": sec}


def summarize(result: dict) -> dict:
    rows = result["rows"]
    out = {}
    for n in TARGETS:
        for ref in ("cold", "random"):
            key = "warm_iters_to_cold" if ref == "cold" else "warm_iters_to_random"
            vals = [r[key][str(n)] for r in rows]
            reached = [v for v in vals if v is not None]
            # rows that never reach the target within MAX_ITERS count as MAX_ITERS + 1 (a lower bound)
            censored = [v if v is not None else MAX_ITERS + 1 for v in vals]
            out[f"{ref}{n}"] = {
                "target_iters": n,
                "median_warm_iters": statistics.median(censored),
                "mean_warm_iters": statistics.fmean(censored),
                "p90_warm_iters": sorted(censored)[int(0.9 * (len(censored) - 1))],
                "fraction_reached": len(reached) / len(vals),
                "iteration_ratio": n / max(statistics.fmean(censored), 1e-9),
            }
    # at equal iterations: mean over rows of warm objective / cold objective (< 1: warm is better)
    same_iters = {}
    for ref in ("cold", "random"):
        for j, i in enumerate(REPORT_ITERS):
            ratios = [r["warm_rel"][j] / r[f"{ref}_rel"][j] for r in rows]
            same_iters[f"{ref}{i}"] = statistics.fmean(ratios)
    means = {}
    for key in ("cold_rel", "warm_rel", "random_rel"):
        cols = list(zip(*(r[key] for r in rows)))
        means[key] = {str(i): statistics.fmean(c) for i, c in zip(REPORT_ITERS, cols)}
    # what the cache stores (chain_iters warm iterations) over the reference's 5 random-seeded ones
    five = REPORT_ITERS.index(5)
    chain = {"mean_rel": statistics.fmean(r["chain_rel"] for r in rows),
             "over_random5": statistics.fmean(r["chain_rel"] / r["random_rel"][five] for r in rows),
             "over_cold5": statistics.fmean(r["chain_rel"] / r["cold_rel"][five] for r in rows)}
    sec = result["seconds"]
    timing = {
        "cold_init_ms_per_run": 1e3 * sec["init"] / max(sec["inits"], 1),
        "cold_ms_per_iter": 1e3 * sec["cold"] / max(sec["cold_iters"], 1),
        "warm_ms_per_iter": 1e3 * sec["warm"] / max(sec["warm_iters"], 1),
    }
    return {"by_target": out, "mean_relative_objective": means, "warm_over_cold_same_iters": same_iters,
            "chain": chain, "timing": timing}


def fmt(iters: float) -> str:
    """An iteration count; MAX_ITERS + 1 means "not reached within MAX_ITERS"."""
    return f">{MAX_ITERS}" if iters > MAX_ITERS else f"{iters:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer spans and heads")
    parser.add_argument("--chain-iters", type=int, default=CHAIN_ITERS,
                        help="warm iterations of every span after the first (kmeans warm_iters)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="default: results/warm_start_kmeans.json, or ..._chain<N>.json for another --chain-iters")
    args = parser.parse_args()
    if args.out is None:
        args.out = OUT if args.chain_iters == CHAIN_ITERS else OUT.with_name(f"{OUT.stem}_chain{args.chain_iters}.json")
    torch.manual_seed(0)
    setups = QUICK if args.quick else SETUPS
    report = {"clusters": CLUSTERS, "chain_iters": args.chain_iters, "max_iters": MAX_ITERS, "quick": args.quick,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "datasets": {}}
    for dataset, (span, spans, heads) in setups.items():
        t0 = time.perf_counter()
        result = measure(dataset, span, spans, heads, args.chain_iters)
        result["summary"] = summarize(result)
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        report["datasets"][dataset] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))

    print(f"k-means C={CLUSTERS}: warm (chain of {args.chain_iters}-iteration warm spans) vs cold; tol=0")
    for dataset, result in report["datasets"].items():
        summ = result["summary"]
        print(f"\n{result['label']}: {result['spans']} spans x {result['tokens_per_span']:,} tokens, "
              f"{result['heads']} heads, {len({(r['layer'], r['tensor']) for r in result['rows']})} layer-tensors")
        print("| cold init | cold iters n | warm iters to same error: median / mean* / p90 | reached in 20 | n / mean* |")
        print("|---|---|---|---|---|")
        for key, row in summ["by_target"].items():
            init = "k-means++" if key.startswith("cold") else "random"
            print(f"| {init} | {row['target_iters']} | {fmt(row['median_warm_iters'])} / {row['mean_warm_iters']:.2f} / "
                  f"{fmt(row['p90_warm_iters'])} | {100 * row['fraction_reached']:.0f}% | {row['iteration_ratio']:.1f}x |")
        print(f"(* rows not reached within {MAX_ITERS} warm iterations count as {MAX_ITERS + 1})")
        m = summ["mean_relative_objective"]
        print("mean objective / span variance after 0, 2, 5, 10, 20 iterations:")
        for key in ("cold_rel", "random_rel", "warm_rel"):
            print(f"  {key[:-4]:>6}: " + "  ".join(f"{v:.4f}" for v in m[key].values()))
        ratio = summ["warm_over_cold_same_iters"]
        print("warm / cold objective at the same iteration count (mean over rows; < 1: warm better):")
        for ref in ("cold", "random"):
            print(f"  vs {'k-means++' if ref == 'cold' else 'random':>9}: " + "  ".join(
                f"{i} it {ratio[f'{ref}{i}']:.4f}" for i in REPORT_ITERS))
        ch = summ["chain"]
        print(f"stored ({args.chain_iters} warm iterations): objective / variance {ch['mean_rel']:.4f}, "
              f"{ch['over_random5']:.4f}x the reference's (random, 5) and {ch['over_cold5']:.4f}x k-means++'s (5)")
        tm = summ["timing"]
        print(f"time: k-means++ init {tm['cold_init_ms_per_run']:.0f} ms/run, iteration {tm['cold_ms_per_iter']:.0f} ms "
              f"(cold) / {tm['warm_ms_per_iter']:.0f} ms (warm); wall {result['wall_seconds']} s")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
