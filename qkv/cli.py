"""Command line: ``qkv eval`` (the main evaluation) and ``qkv list``."""

from __future__ import annotations

import argparse
import os
import sys


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from qkv.evaluation import evaluate
    from qkv.evaluation.report import (
        environment,
        format_markdown,
        format_table,
        plot_frontier,
        write_json,
    )
    from qkv.evaluation.suite import build_suite
    from qkv.realdata import list_datasets, load_dataset

    import torch

    device = _device(args.device)
    datasets = args.datasets.split(",") if args.datasets else list_datasets()
    presets = args.policies.split(",") if args.policies else None
    results, labels = [], {}
    for dataset in datasets:
        print(f"loading {dataset} (built and cached on first use)...", file=sys.stderr)
        samples = load_dataset(dataset, progress=not args.quiet)
        if args.layers:
            samples = samples[: args.layers]
        first = samples[0]
        tokens = first.k.shape[2]
        labels[dataset] = f"{first.label.split(' L')[0]}; {len(samples)} layers x {list(first.k.shape)}"
        suite = build_suite(
            [tuple(s.k.shape) for s in samples], torch.bfloat16,
            presets=presets, matched=not args.no_matched, sweep=not args.no_sweep,
            ablation=not args.no_ablation,
        )
        for entry in tqdm(suite, desc=f"{dataset} ({tokens} tokens)", disable=args.quiet, file=sys.stderr):
            results.append(
                evaluate(entry.policy, entry.name, dataset, samples, device=device,
                         family=entry.family, group=entry.group)
            )
    print(format_table(results, labels))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "eval.json")
    png_path = os.path.join(args.out, "frontier.png")
    md_path = os.path.join(args.out, "eval.md")
    write_json(json_path, results, labels, environment(device))
    plot_frontier(png_path, results, labels)
    with open(md_path, "w") as f:
        f.write(format_markdown(results, labels))
    print(f"\nwrote {json_path}, {md_path} and {png_path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qkv.caches.presets import OVERRIDES, PRESETS
    from qkv.spec import KINDS

    print("presets:")
    for name, (spec, text) in PRESETS.items():
        print(f"  {name:9s} {text}\n            {spec}")
    print("\ncomponents:")
    for kind, registry in KINDS.items():
        print(f"  {kind:10s} {', '.join(registry.list())}")
    print("\noverrides: " + ", ".join(OVERRIDES))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="compare every policy on real K/V (table, JSON, PNG)")
    ev.add_argument("--datasets", help="comma-separated (default: all real datasets)")
    ev.add_argument("--policies", help="comma-separated presets (default: all)")
    ev.add_argument("--layers", type=int, default=0, help="only the first N layers of each dataset")
    ev.add_argument("--no-matched", action="store_true", help="skip the matched-bits runs")
    ev.add_argument("--no-sweep", action="store_true", help="skip the bit-width sweeps")
    ev.add_argument("--no-ablation", action="store_true", help="skip the qvg-ref -> qvg steps")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ev.add_argument("--out", default=os.path.join("results", "eval"), help="output folder")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval)
    ls = sub.add_parser("list", help="presets, components and overrides")
    ls.set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
