"""What every GPU benchmark here shares: device facts, timing, memory and test data.

    from common import clustered, copy_bandwidth, environment, gpu_ms, ms, peak_extra

Run the benchmarks from the repository root (``python benchmarks/bench_<op>.py``): this folder is
then on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import random
import statistics

import torch


def environment() -> dict:
    """What the numbers were measured on: GPU, CUDA, torch, triton and Python versions."""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def ms(fn, *, warmup: int = 50, rep: int = 200) -> float:
    """Median wall time of ``fn`` per call on the GPU stream, in milliseconds (what a caller
    waits for, launches and host work included)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def gpu_ms(fn, *, rep: int = 200) -> float | None:
    """GPU time alone (the call replayed from a CUDA graph: no Python or launch overhead), or None
    if the call cannot be captured (e.g. a host sync inside it)."""
    from triton.testing import do_bench_cudagraph

    try:
        return do_bench_cudagraph(fn, rep=rep, return_mode="median")
    except Exception:  # noqa: BLE001 - any capture failure means "not capturable"
        return None


def copy_bandwidth() -> float:
    """Device copy bandwidth, bytes read + written per second (1 GiB bf16 copy)."""
    src = torch.empty(512 * 2**20, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (ms(lambda: dst.copy_(src)) * 1e-3)


def matmul_rate() -> float:
    """Dense bf16 matmul FLOP/s (8192^3)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / (ms(lambda: a @ a) * 1e-3)


def peak_extra(fn) -> int:
    """Bytes ``fn`` allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def clustered(
    shape: tuple[int, int, int, int], *, clusters: int = 256, seed: int = 0, scale: float = 1.0, device: str = "cuda"
) -> torch.Tensor:
    """[B, H, S, D] bf16 on ``device`` with cluster structure (what k-means smoothing exploits):
    ``clusters`` centres per head, unit-variance centres times 2 plus noise of 0.5."""
    b, h, s, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(b * h, clusters, d, generator=g, device=device) * 2
    labels = torch.randint(0, clusters, (b * h, s), generator=g, device=device)
    x = torch.gather(centres, 1, labels.unsqueeze(-1).expand(-1, -1, d))
    x = x + 0.5 * torch.randn(b * h, s, d, generator=g, device=device)
    return (x * scale).view(shape).bfloat16()


def gpu_main_args(doc: str, name: str) -> argparse.Namespace:
    """The ``--out`` argument of a GPU-only benchmark (``doc``: its module docstring), after checking
    that a GPU is here; seeds torch's generator."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{name} times kernels on a GPU: no CUDA device here")
    torch.manual_seed(0)
    return args


def write_json(path: str | pathlib.Path, results: dict) -> None:
    """Write ``results`` (with :func:`environment` added) to ``path``, creating its folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **results}, indent=1))


def oversampling(text: str) -> tuple[int, int]:
    """An ``RxL`` argument (k-means|| oversampling: R rounds of L x C candidates) as (R, L)."""
    try:
        rounds, per_round = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROUNDSxCLUSTERS such as 2x2, got {text!r}") from None
    if rounds < 1 or per_round < 1:
        raise argparse.ArgumentTypeError(f"rounds and candidates per round must be >= 1, got {text!r}")
    return rounds, per_round


@contextlib.contextmanager
def overridden(module, values: dict):
    """Module constants set to ``values`` for the block, restored after it."""
    before = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(module, name, value)


def paired_ratio(times: list[float], base: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """The median of ``times[i] / base[i]`` (pairs timed side by side, e.g. two caches' steps taking
    turns) and its 95% bootstrap interval (``resamples`` draws of the pairs with replacement)."""
    if len(times) != len(base) or not times:
        raise ValueError(f"paired_ratio: {len(times)} times against {len(base)} base times")
    ratios = [t / b for t, b in zip(times, base)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return {"median": statistics.median(ratios), "low": medians[int(0.025 * resamples)],
            "high": medians[int(0.975 * resamples) - 1]}


def spec_relative_mse(spec: str, x: torch.Tensor) -> float:
    """Relative MSE (sum |x - x_hat|^2 / sum |x|^2) of compressing ``x`` as keys and values with
    the policy ``spec`` and decompressing the keys, on the torch path."""
    import qkv

    policy = qkv.build_policy(spec)
    x_hat, _ = policy.decompress(policy.compress(x, x), backend="torch")
    return float((x_hat.float() - x).pow(2).sum() / x.pow(2).sum())
