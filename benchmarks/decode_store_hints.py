"""The span decode (``dequantize``) with its output stored as it is (a streaming store,
``cache_modifier=".cs"``) and in other forms.

Each variant is ``qkv.kernels.triton.quantize._dequantize_kernel``'s own source with its output
store's hint replaced (none: a plain store; ``eviction_policy="evict_first"``), swapped in for the
decode of qvg and rtn spans (LongCat [1,32,29640,128] and Self-Forcing [1,12,37440,128], clustered
bf16). Each variant's output must equal the kernel's; GPU time as ``common.gpu_ms`` takes it;
"as_is_again" times the kernel as it is once more after the variants (the run's drift). The
results before the kernel took the hint (``results/decode_store_hints_{h200,h100}.json``) name the
plain store "plain" and the hint "cs".

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

STORE_END = 'mask=mask, cache_modifier=".cs")'  # how the kernel's output store ends
VARIANTS = {"no_hint": "mask=mask)", "evict_first": 'mask=mask, eviction_policy="evict_first")'}
AS_IS = quantize._dequantize_kernel


def variant(tag: str, store_end: str):
    """The dequantize kernel compiled from its own source with its store ending in ``store_end``."""
    source = inspect.getsource(AS_IS.fn)
    if source.count(STORE_END) != 1:
        raise RuntimeError("the dequantize kernel's output store is not where this script looks for it")
    source = source.replace(STORE_END, store_end)
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
    kernels = {"as_is": AS_IS, **{tag: variant(tag, end) for tag, end in VARIANTS.items()}, "as_is_again": AS_IS}
    rows = []
    try:
        for name, shape in {"longcat": (1, 32, 29640, 128), "self-forcing": (1, 12, 37440, 128)}.items():
            x = clustered(shape)
            for spec in ("qvg", "rtn"):
                tp = qkv.build_policy(spec).k
                ct = tp.compress(x)
                quantize._dequantize_kernel = AS_IS
                ref = tp.decompress(ct)
                row = {"shape": name, "spec": spec}
                for label, kernel in kernels.items():
                    quantize._dequantize_kernel = kernel
                    row[label + "_same"] = bool(torch.equal(tp.decompress(ct), ref))
                    row[label] = gpu_ms(lambda: tp.decompress(ct))
                rows.append(row)
                print(row, flush=True)
    finally:
        quantize._dequantize_kernel = AS_IS
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
