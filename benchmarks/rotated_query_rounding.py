"""How much error rounding the rotated queries H q to bf16 adds to attention over quarot spans,
emulated in torch on the CPU with the decode kernel's roundings, against the bound the kernel
tests hold it to (at most twice the error of decompress + SDPA in bf16, both against an fp32
attention over the history decompressed in fp32).

The kernel decodes the rotated keys and values H k, H v (rounded to bf16 once), scores them
against H q, rounds the softmax weights to bf16 for the value product, accumulates in fp32 and
rotates the output back. H q either split in two bf16 parts (exact to ~2^-16: "split") or rounded
once ("rounded"). Llama-3-8B heads (32 query heads on 8 KV heads x 128), two 2,048-token quarot
spans and a 300-token tail, 1 and 16 queries, three seeds.

    PYTHONPATH=. python3 benchmarks/rotated_query_rounding.py --out benchmarks/results/rotated_query_rounding_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from common import environment, write_json

import qkv
from qkv.kernels import CompressedSpan, DenseKV
from qkv.kernels.hadamard import hadamard_torch

HEADS, KV_HEADS, D = 32, 8, 128


def randn(seed: int, *shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


def history(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V of the history decompressed to bf16 (the cache's dtype) and to fp32 (no rounding of
    the decoded values)."""
    policy = qkv.build_policy("quarot")
    segments = [CompressedSpan(policy.compress(randn(seed + i, 1, KV_HEADS, 2048, D, scale=2.0),
                                               randn(seed + 10 + i, 1, KV_HEADS, 2048, D)), 17 * i) for i in range(2)]
    segments.append(DenseKV(randn(seed + 20, 1, KV_HEADS, 300, D), randn(seed + 21, 1, KV_HEADS, 300, D)))
    out = []
    for fp32 in (False, True):
        parts = []
        for seg in segments:
            if fp32 and isinstance(seg, CompressedSpan):
                ckv = seg.ckv
                seg = CompressedSpan(dataclasses.replace(ckv, k=dataclasses.replace(ckv.k, dtype=torch.float32),
                                                         v=dataclasses.replace(ckv.v, dtype=torch.float32)), seg.skip)
            parts.append([t.float() if fp32 else t for t in seg.materialize(backend="torch")])
        k, v = zip(*parts)
        out += [torch.cat(k, 2), torch.cat(v, 2)]
    return tuple(out)


def kernel_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: bool) -> torch.Tensor:
    """The decode kernel's roundings over rotated keys: H k, H v in bf16, H q exact or in bf16,
    the weights in bf16 for the value product, fp32 sums, the output rotated back, then bf16."""
    h = hadamard_torch(torch.eye(D))
    group = q.shape[1] // k.shape[1]
    kr = (k @ h).bfloat16().float().repeat_interleave(group, 1)
    vr = (v @ h).bfloat16().float().repeat_interleave(group, 1)
    qr = q.float() @ h
    if not split:
        qr = qr.bfloat16().float()
    s = qr @ kr.transpose(-1, -2) * D**-0.5
    e = torch.exp(s - s.amax(-1, keepdim=True))
    out = (e.bfloat16().float() @ vr) / e.sum(-1, keepdim=True)
    return (out @ h).bfloat16()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for seed in (0, 100, 200):
        k16, v16, k, v = history(seed)
        for sq in (1, 16):
            q = randn(seed + 50, 1, HEADS, sq, D)
            ref = F.scaled_dot_product_attention(q.float(), k, v, enable_gqa=True)
            plain = F.scaled_dot_product_attention(q, k16, v16, enable_gqa=True).float()
            base = (plain - ref).abs()
            row = {"seed": seed, "queries": sq, "sdpa_max": base.max().item(), "sdpa_mean": base.mean().item()}
            for name, split in (("split", True), ("rounded", False)):
                err = (kernel_like(q, k, v, split).float() - ref).abs()
                row[name] = {"max": err.max().item(), "mean": err.mean().item(),
                             "max_over_sdpa": (err.max() / base.max()).item(),
                             "mean_over_sdpa": (err.mean() / base.mean()).item()}
            rows.append(row)
            print(seed, sq, {n: (round(row[n]["max_over_sdpa"], 2), round(row[n]["mean_over_sdpa"], 2))
                             for n in ("split", "rounded")}, flush=True)
    write_json(args.out, {"environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
