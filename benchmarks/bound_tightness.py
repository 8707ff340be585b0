"""How tight the guaranteed error bounds are on real K/V: reported bound vs observed error, per preset.

For every preset and real dataset (``qkv.realdata``), K and V of every layer (the first ``--heads``
heads, as bf16 (what caches hold) and as fp32 (as captured)) are compressed; the bound each compressed
tensor reports from its stored data alone (``policy.error_bound``) is compared with the error the
reconstruction actually has:

- ``bound_max``  the largest reported bound (per element, or per token in L2 for ``quarot``);
- ``error_max``  the largest observed error, measured the same way;
- ``ratio_max``  max over elements/tokens of error / bound: 1.0 means the bound is attained
                 somewhere, and it must never exceed 1;
- ``ratio_mean`` mean of error / bound: how much of its bound a typical element uses.

Window tokens (kivi) have bound 0 and error 0 and are left out of the ratios; elements whose bound
is 0 elsewhere (exactly stored) are too.

    python benchmarks/bound_tightness.py        # writes benchmarks/results/bound_tightness.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

import qkv
from qkv.realdata import list_datasets, load_dataset

OUT = pathlib.Path(__file__).resolve().parent / "results" / "bound_tightness.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def policy_for(preset: str, head_dim: int) -> qkv.Policy:
    """The preset; where its per-token block does not divide D (MiniLM's 32), the block becomes D."""
    policy = qkv.build_policy(preset)
    for tensor in (policy.k, policy.v):
        codes = tensor.quantizer.code_format()
        if codes is not None and codes.axis == "token" and head_dim % codes.block:
            return qkv.build_policy(preset, block=head_dim)
    return policy


class Tally:
    """Running max/mean of bound, error and error/bound over many tensors."""

    def __init__(self) -> None:
        self.bound_max = self.error_max = self.ratio_max = 0.0
        self.ratio_sum = 0.0
        self.count = 0
        self.violations = 0
        self.kind = None

    def add(self, bound: qkv.Bound, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.kind = bound.kind.value
        err = bound.errors(x, x_hat)
        keep = bound.value > 0
        ratio = err[keep] / bound.value[keep]
        self.violations += int(bound.violations(x, x_hat).sum())
        self.bound_max = max(self.bound_max, bound.max())
        self.error_max = max(self.error_max, float(err.max()))
        if ratio.numel():
            self.ratio_max = max(self.ratio_max, float(ratio.max()))
            self.ratio_sum += float(ratio.sum())
            self.count += ratio.numel()

    def result(self) -> dict:
        return {
            "kind": self.kind,
            "bound_max": self.bound_max,
            "error_max": self.error_max,
            "ratio_max": self.ratio_max,
            "ratio_mean": self.ratio_sum / max(self.count, 1),
            "violations": self.violations,
        }


def measure(preset: str, samples, heads: int, dtype: torch.dtype) -> dict:
    tallies = {"k": Tally(), "v": Tally()}
    policy = policy_for(preset, samples[0].k.shape[-1])
    for sample in samples:
        k, v = sample.k[:, :heads].to(dtype), sample.v[:, :heads].to(dtype)
        ckv = policy.compress(k, v)
        k_hat, v_hat = policy.decompress(ckv)
        bound = policy.error_bound(ckv, k_hat, v_hat)
        tallies["k"].add(bound.k, k, k_hat)
        tallies["v"].add(bound.v, v, v_hat)
    return {"spec": policy.spec, **{name: t.result() for name, t in tallies.items()}}


def table(rows: list[dict]) -> str:
    head = (
        f"{'preset':9} {'dataset':16} {'dtype':5} {'':2} {'kind':8} {'bound max':>10} {'error max':>10} "
        f"{'err/bnd max':>11} {'err/bnd mean':>12}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        for name in ("k", "v"):
            r = row[name]
            lines.append(
                f"{row['preset']:9} {row['dataset']:16} {row['dtype']:5} {name.upper():2} {r['kind']:8} {r['bound_max']:10.4g} "
                f"{r['error_max']:10.4g} {r['ratio_max']:11.4f} {r['ratio_mean']:12.4f}"
            )
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    """Per preset and input dtype, over every dataset and K/V: the bound kind, the worst and the
    mean error/bound ratio, and the largest bound next to the largest observed error."""
    out = []
    for key in dict.fromkeys((r["preset"], r["dtype"]) for r in rows):
        parts = [r[n] for r in rows if (r["preset"], r["dtype"]) == key for n in ("k", "v")]
        out.append({
            "preset": key[0],
            "dtype": key[1],
            "kind": parts[0]["kind"],
            "ratio_max": max(p["ratio_max"] for p in parts),
            "ratio_mean": sum(p["ratio_mean"] for p in parts) / len(parts),
            "bound_max": max(p["bound_max"] for p in parts),
            "error_max": max(p["error_max"] for p in parts),
            "violations": sum(p["violations"] for p in parts),
        })
    return out


def summary_table(rows: list[dict]) -> str:
    head = f"{'preset':9} {'dtype':5} {'kind':8} {'err/bnd max':>11} {'err/bnd mean':>12} {'bound max':>10} {'error max':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["bound_max"] == 0:  # stored exactly
            ratios = f"{'exact':>11} {'exact':>12}"
        else:
            ratios = f"{r['ratio_max']:11.4f} {r['ratio_mean']:12.4f}"
        lines.append(
            f"{r['preset']:9} {r['dtype']:5} {r['kind']:8} {ratios} {r['bound_max']:10.4g} {r['error_max']:10.4g}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default=",".join(list_datasets()))
    parser.add_argument("--presets", default=",".join(qkv.list_policies()))
    parser.add_argument("--heads", type=int, default=2, help="first heads of every layer (CPU time)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="input dtypes, comma-separated")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    rows = []
    started = time.time()
    for dataset in args.datasets.split(","):
        samples = load_dataset(dataset, progress=False)
        label = f"{samples[0].label.split(' L')[0]}; {len(samples)} layers x {list(samples[0].k.shape)}"
        for dtype_name in args.dtypes.split(","):
            for preset in args.presets.split(","):
                t0 = time.time()
                row = {"preset": preset, "dataset": dataset, "dtype": dtype_name, "label": label,
                       **measure(preset, samples, args.heads, DTYPES[dtype_name])}
                row["seconds"] = round(time.time() - t0, 1)
                rows.append(row)
                print(f"{dataset} {dtype_name} {preset}: {row['seconds']} s", flush=True)
    print(table(rows))
    totals = summary(rows)
    print("\nover every dataset, K and V:\n" + summary_table(totals))
    bad = sum(r[n]["violations"] for r in rows for n in ("k", "v"))
    print(f"\nviolations: {bad} (must be 0)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "reported error bound vs observed error, per preset, on real K/V",
        "heads_per_layer": args.heads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": round(time.time() - started, 1),
        "summary": totals,
        "rows": rows,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
