"""Triton log-sum-exp merge of two partial attention results, twin of
:func:`qkv.kernels.attention.merge_torch`.

One pass per query row: the running fp32 output and log-sum-exp are read, rescaled and updated in
place with the part's output (any float dtype, any strides along batch, heads and queries) and
log-sum-exp. The reference takes six elementwise launches and writes its intermediates; this
reads each input once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, part_ptr, part_lse_ptr, H, S, D,
                  o_b, o_h, o_s, l_b, l_h, l_s, p_b, p_h, p_s, pl_b, pl_h, pl_s,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    mask = s_ok[:, None] & (d < D)[None, :]
    lse_at = lse_ptr + b.to(tl.int64) * l_b + h * l_h + s * l_s
    lse_a = tl.load(lse_at, mask=s_ok, other=0.0)
    lse_b = tl.load(part_lse_ptr + b.to(tl.int64) * pl_b + h * pl_h + s * pl_s, mask=s_ok, other=0.0).to(tl.float32)
    peak = tl.maximum(lse_a, lse_b)
    w_a = tl.exp(lse_a - peak)
    w_b = tl.exp(lse_b - peak)
    total = w_a + w_b
    out_at = out_ptr + b.to(tl.int64) * o_b + h * o_h + s[:, None].to(tl.int64) * o_s + d[None, :]
    out = tl.load(out_at, mask=mask, other=0.0)
    part_at = part_ptr + b.to(tl.int64) * p_b + h * p_h + s[:, None].to(tl.int64) * p_s + d[None, :]
    part = tl.load(part_at, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_at, (out * (w_a / total)[:, None] + part * (w_b / total)[:, None]), mask=mask)
    tl.store(lse_at, peak + tl.log(total), mask=s_ok)


def merge_supports(state, part) -> str | None:
    """Why the kernel cannot merge these (None if it can): it needs the running output in fp32 and
    unit strides along D."""
    out, lse = state
    part_out, part_lse = part
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        return f"the running state is {out.dtype} / {lse.dtype}, not fp32"
    if out.stride(-1) != 1 or part_out.stride(-1) != 1:
        return "the outputs are not contiguous along D"
    return None


def merge_triton(state, part):
    """Triton twin of :func:`qkv.kernels.attention.merge_torch`: ``state`` (out [B, H, Sq, D] fp32,
    lse [B, H, Sq] fp32) is updated in place with ``part`` and returned."""
    out, lse = state
    part_out, part_lse = part
    b, h, s, d = out.shape
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(64, 4096 // block_d))
    _merge_kernel[(triton.cdiv(s, block_s), b * h)](
        out, lse, part_out, part_lse, h, s, d,
        *out.stride()[:3], *lse.stride(), *part_out.stride()[:3], *part_lse.stride(),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )
    return out, lse
