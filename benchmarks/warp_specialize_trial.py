"""Does Triton's automatic warp specialization speed up the fused attention kernel?

The kernel's two tile loops (over compressed spans and over full-precision segments) are compiled
as they are and with ``warp_specialize=True`` added to their ``tl.range``; each variant attends
to the 16-chunk Wan-1.3B history of ``bench_attention.py`` (two qvg spans, or two bf16 spans, plus
the chunk; and 17 chunks of bf16 keys alone). Also records the registers and spills of the
kernels as compiled (the kernel's limit is the work around the tensor cores, see docs/attention.md).

    PYTHONPATH=. python3 benchmarks/warp_specialize_trial.py --out benchmarks/results/warp_specialize_trial_h100.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import platform
import tempfile

import torch
import triton

import qkv
from bench_attention import CHUNK, DEVICE, HEAD_DIM, HEADS, clustered, span_of, timed
from qkv.kernels import CompressedSpan, DenseKV
from qkv.kernels.triton import attention as fused_kernel
from qkv.kernels.triton import attention_kernel as kernel_module

# the kernel's tile loops: the span loop (pipelined PIPE deep) and the full-precision loop
LOOPS = {"span_loop": "num_stages=PIPE)", "dense_loop": "num_stages=DENSE_STAGES)"}


def variant(name: str, loop: str, workdir: pathlib.Path):
    """attention_kernel compiled from its source with ``warp_specialize=True`` on one loop."""
    source = pathlib.Path(kernel_module.__file__).read_text()
    if source.count(loop) != 1:
        raise RuntimeError(f"expected one loop ending in {loop!r} in {kernel_module.__file__}")
    path = workdir / f"attention_kernel_{name}.py"
    path.write_text(source.replace(loop, loop[:-1] + ", warp_specialize=True)"))
    spec = importlib.util.spec_from_file_location(f"attention_kernel_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.attention_kernel


def compiled_kernels(kernel) -> list[dict]:
    """Registers, spills and shared memory of every specialization compiled and loaded so far (one
    that did not fit the GPU's shared memory was compiled but never loaded: it has no registers)."""
    rows = []
    for entry in kernel.device_caches.values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        for compiled in cache.values():
            if not hasattr(compiled, "n_regs"):
                continue
            rows.append({"registers": compiled.n_regs, "spills": compiled.n_spills,
                         "shared_bytes": compiled.metadata.shared, "warps": compiled.metadata.num_warps})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    q = clustered(999) * 0.1
    chunk = DenseKV(clustered(14, scale=2.0), clustered(15))
    k = torch.randn(1, HEADS, 17 * CHUNK, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    histories = {"bf16_keys": [DenseKV(k, k)]}
    for name in ("qvg", "bf16"):
        policy = qkv.build_policy(name)
        histories[f"{name}_spans"] = [CompressedSpan(span_of(policy, 10), policy),
                                      CompressedSpan(span_of(policy, 12), policy), chunk]
    original = fused_kernel.attention_kernel
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        kernels = {"as_is": original, **{name: variant(name, loop, pathlib.Path(tmp)) for name, loop in LOOPS.items()}}
        try:
            for history, segments in histories.items():
                expected = None
                for name, kernel in kernels.items():
                    fused_kernel.attention_kernel = kernel
                    out = qkv.kernels.attention(q, segments)
                    expected = out if expected is None else expected
                    rows.append({"history": history, "warp_specialize": name,
                                 "ms": timed(lambda: qkv.kernels.attention(q, segments), reps=11),
                                 "max_abs_diff_vs_as_is": (out.float() - expected.float()).abs().max().item()})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            fused_kernel.attention_kernel = original
        compiled = {name: compiled_kernels(kernel) for name, kernel in kernels.items()}
    with open(args.out, "w") as f:
        json.dump({"env": env, "rows": rows, "compiled": compiled}, f, indent=1)


if __name__ == "__main__":
    main()
