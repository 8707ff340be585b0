"""How many k-means clusters a span can afford: QVG's error and bits against the span's length.

A span's centroids cost 16 C / S bits per element (C centroids of D bf16 values over S tokens), so
the cluster count that pays on LongCat-Video's 29,640-token spans (C = 256: 0.14 bits) costs more
than the codes themselves on a SANA-WM block (2,640 tokens a head: 1.55 bits). This cuts the real
K/V of ``qkv.realdata`` into consecutive spans of ``SPANS`` tokens (the first ``--spans`` of each
layer), compresses each head of each span with qvg at every cluster count of ``CLUSTERS`` (at most
the span's tokens) and with rtn and KIVI (no full-precision window) for reference, and reports the
exact stored bits per element and the relative MSE of K and V (``qkv.evaluation.evaluate``:
bf16 inputs, errors in fp64). Span lengths: an AnyFlow-FAR coarse chunk (1,170), a SANA-WM block
(2,640), a Self-Forcing chunk (4,680), eight of them (37,440).

Datasets: ``wan`` (a Wan2.1-1.3B-shaped DiT with random weights over real video frames, 12 x 128)
and ``whisper-encoder`` (Whisper tiny.en with its real weights over real speech, 6 x 64).

    python3 benchmarks/clusters_per_span.py --out benchmarks/results/clusters_per_span.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import types

import torch
from tqdm.auto import tqdm

import qkv
from qkv.evaluation.runner import evaluate
from qkv.realdata import load_dataset

SPANS = (1170, 2640, 4680, 37440)
CLUSTERS = (4, 8, 16, 32, 64, 256)
DATASETS = ("wan", "whisper-encoder")


def policies(span: int) -> dict[str, qkv.Policy]:
    out = {f"qvg(clusters={c})": qkv.build_policy("qvg", clusters=c) for c in CLUSTERS if c <= span}
    out["rtn"] = qkv.build_policy("rtn")
    out["kivi(window=0)"] = qkv.build_policy("kivi", window=0)
    return out


def spans_of(samples, span: int, count: int) -> list:
    """The first ``count`` whole spans of ``span`` tokens of every layer (objects with k and v)."""
    out = []
    for sample in samples:
        for i in range(min(count, sample.k.shape[2] // span)):
            cut = slice(i * span, (i + 1) * span)
            out.append(types.SimpleNamespace(k=sample.k[:, :, cut], v=sample.v[:, :, cut]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--spans", type=int, default=2, help="spans per layer and length")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for dataset in args.datasets:
        samples = load_dataset(dataset)
        for span in SPANS:
            pieces = spans_of(samples, span, args.spans)
            if not pieces:
                continue
            for name, policy in tqdm(policies(span).items(), desc=f"{dataset}, {span} tokens"):
                result = evaluate(policy, name, dataset, pieces, device=torch.device("cpu"))
                rows.append({"dataset": dataset, "span_tokens": span, "spans": len(pieces), "policy": name,
                             "bits": result.bits, "ratio_vs_bf16": result.ratio_vs_bf16,
                             "rel_mse_k": result.rel_mse_k, "rel_mse_v": result.rel_mse_v})
                print(json.dumps(rows[-1]), flush=True)
    out = {"torch": torch.__version__, "spans_per_layer": args.spans, "rows": rows}
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
