"""Run one policy over the layers of one real dataset and measure size, error and time."""

from __future__ import annotations

import dataclasses
import time

import torch

from qkv.caches import Policy
from qkv.evaluation.metrics import ErrorSum, snr_db


@dataclasses.dataclass(frozen=True)
class Result:
    """One row of the evaluation: a policy on a dataset (all its layers together)."""

    dataset: str
    policy: str
    family: str  # preset the policy derives from (curves of the frontier plot)
    spec: str
    group: str  # "preset", "matched" (fitted to a bit budget) or "sweep" (frontier points)
    bits_k: float
    bits_v: float
    bits: float
    ratio_vs_bf16: float
    rel_mse_k: float
    rel_mse_v: float
    snr_k_db: float
    snr_v_db: float
    encode_ms: float
    decode_ms: float
    device: str
    elements: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    policy: Policy,
    name: str,
    dataset: str,
    samples,
    *,
    device: torch.device,
    family: str | None = None,
    group: str = "preset",
    dtype: torch.dtype = torch.bfloat16,
) -> Result:
    """Compress and decompress every layer of ``samples`` (``KVSample`` list, K and V
    [1, H, S, D]) in ``dtype``, one head at a time.

    Each head is compressed on its own. A head's result does not depend on the other heads
    (k-means's random draws are shared by all rows, as when :class:`qkv.KVCache` compresses a
    span's heads in one call), so a subset of the heads gives exactly those heads' rows of the
    full run, and every call's temporaries are 1/H of the layer's size. Errors are measured against the ``dtype`` tensors (what a bf16 cache
    holds); sizes are the exact stored bytes; times are wall-clock on ``device`` (synchronized on
    CUDA), summed over the heads.
    """
    err_k, err_v = ErrorSum(), ErrorSum()
    bytes_k = bytes_v = elements = 0
    encode = decode = 0.0
    for sample in samples:
        layer_k = sample.k.to(device=device, dtype=dtype)
        layer_v = sample.v.to(device=device, dtype=dtype)
        for head in range(layer_k.shape[1]):
            k, v = layer_k[:, head : head + 1], layer_v[:, head : head + 1]
            _sync(device)
            t0 = time.perf_counter()
            ckv = policy.compress(k, v)
            _sync(device)
            t1 = time.perf_counter()
            k_hat, v_hat = policy.decompress(ckv)
            _sync(device)
            t2 = time.perf_counter()
            encode += t1 - t0
            decode += t2 - t1
            err_k.add(k, k_hat)
            err_v.add(v, v_hat)
            bytes_k += ckv.k.nbytes
            bytes_v += ckv.v.nbytes
            elements += k.numel()
    bits_k, bits_v = 8 * bytes_k / elements, 8 * bytes_v / elements
    bits = (bits_k + bits_v) / 2
    return Result(
        dataset=dataset,
        policy=name,
        family=family or name,
        spec=policy.spec,
        group=group,
        bits_k=bits_k,
        bits_v=bits_v,
        bits=bits,
        ratio_vs_bf16=16 / bits,
        rel_mse_k=err_k.relative_mse,
        rel_mse_v=err_v.relative_mse,
        snr_k_db=snr_db(err_k.relative_mse),
        snr_v_db=snr_db(err_v.relative_mse),
        encode_ms=1000 * encode,
        decode_ms=1000 * decode,
        device=str(device),
        elements=elements,
    )
