"""The span decode (``dequantize``) with its output stored as it is and with streaming-store hints.

Each variant is ``qkv.kernels.triton.quantize._dequantize_kernel``'s own source with one keyword
added to its output store (``eviction_policy="evict_first"`` or ``cache_modifier=".cs"``), swapped
in for the decode of qvg and rtn spans (LongCat [1,32,29640,128] and Self-Forcing [1,12,37440,128],
clustered bf16). Each variant's output must equal the kernel's; GPU time as ``common.gpu_ms``
takes it; "plain_again" times the kernel as it is once more after the variants (the run's drift).

    PYTHONPATH=. python3 benchmarks/decode_store_hints.py --out benchmarks/results/decode_store_hints.json
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import pathlib
import tempfile

import torch
from common import clustered, gpu_ms, write_json

import qkv
import qkv.kernels.triton.quantize as quantize

STORE_END = "mask=mask)"  # how the kernel's output store ends
VARIANTS = {"evict_first": 'eviction_policy="evict_first"', "cs": 'cache_modifier=".cs"'}
PLAIN = quantize._dequantize_kernel


def variant(tag: str, keyword: str):
    """The dequantize kernel compiled from its own source with ``keyword`` added to its store."""
    source = inspect.getsource(PLAIN.fn)
    if source.count(STORE_END) != 1:
        raise RuntimeError("the dequantize kernel's output store is not where this script looks for it")
    source = source.replace(STORE_END, f"mask=mask, {keyword})")
    path = pathlib.Path(tempfile.mkdtemp()) / f"dequantize_{tag}.py"
    # the kernel's module namespace (its helpers), then the changed kernel
    path.write_text(f"from {quantize.__name__} import *  # noqa: F403\n"
                    f"from {quantize.__name__} import Source, decode_tile, stage_rows, to_output, tl, triton\n\n"
                    + source)
    spec = importlib.util.spec_from_file_location(f"dequantize_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._dequantize_kernel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    plain = PLAIN
    kernels = {"plain": plain, **{tag: variant(tag, kw) for tag, kw in VARIANTS.items()}, "plain_again": plain}
    rows = []
    try:
        for name, shape in {"longcat": (1, 32, 29640, 128), "self-forcing": (1, 12, 37440, 128)}.items():
            x = clustered(shape)
            for spec in ("qvg", "rtn"):
                tp = qkv.build_policy(spec).k
                ct = tp.compress(x)
                quantize._dequantize_kernel = plain
                ref = tp.decompress(ct)
                row = {"shape": name, "spec": spec}
                for label, kernel in kernels.items():
                    quantize._dequantize_kernel = kernel
                    row[label + "_same"] = bool(torch.equal(tp.decompress(ct), ref))
                    row[label] = gpu_ms(lambda: tp.decompress(ct))
                rows.append(row)
                print(row, flush=True)
    finally:
        quantize._dequantize_kernel = plain
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
