"""flashdreams' two CUDA-only kernels restated in torch, so that its ``WanDiTNetwork`` runs on the
CPU (the adapter's tests, ``benchmarks/bench_pipelines.py --tiny``): the fused Triton RoPE
(``core/attention/rope_kernel.py``, ``apply_rotary_pos_emb``: pairs (2k, 2k+1) rotated by cos/sin
of the first D/2 frequencies, in place) and the cuDNN SDPA behind ``ContextParallelAttention``
without context parallelism (``core/attention/cp.py``: plain softmax attention).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch.nn.functional as F
from flashdreams.core.attention import rope as rope_mod


def rope_torch(x, freqs, interleaved=False, inplace=True):
    """``rope_kernel.apply_rotary_pos_emb`` (interleaved, in place) in plain torch."""
    assert interleaved and inplace
    f = freqs[:, 0, 0, : x.shape[-1] // 2].float()
    cos, sin = f.cos().to(x.dtype)[None, :, None], f.sin().to(x.dtype)[None, :, None]
    a, b = x[..., 0::2].clone(), x[..., 1::2].clone()
    x[..., 0::2], x[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return x


def sdpa(query, key, value):
    return F.scaled_dot_product_attention(query, key, value)


@contextlib.contextmanager
def cpu_kernels(network):
    """``network``'s RoPE and every block's self- and cross-attention on the restated kernels."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(rope_mod, "apply_rotary_pos_emb", rope_torch))
        for block in network.blocks:
            stack.enter_context(mock.patch.object(block.self_attn.attn_op, "_impl", sdpa))
            stack.enter_context(mock.patch.object(block.cross_attn.attn_op, "_impl", sdpa))
        yield network
