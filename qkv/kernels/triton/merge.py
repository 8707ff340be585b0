"""Triton log-sum-exp merge of partial attention results into a running state, twin of
:func:`qkv.kernels.attention.merge_torch`.

One pass per query row: up to ``MERGE_PARTS`` parts (outputs in any float dtype, any strides
along batch, heads and queries shared by the parts of a launch; log-sum-exps likewise) are folded
into the running fp32 output and log-sum-exp, which are read (unless the state starts with this
launch) and written once, in place. Pairwise merges of n parts read and write the state n times;
this reads each input once per launch. The reference takes six elementwise launches a part and
writes its intermediates.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from qkv.kernels.attention import MERGE_PARTS  # parts folded in by one launch: the kernel's pointer pairs
from qkv.kernels.triton.launch import Launcher


@triton.jit
def _nth(i: tl.constexpr, a0, a1, a2, a3):
    """The ``i``-th of four arguments (``i`` known when compiling)."""
    if i == 0:
        r = a0
    elif i == 1:
        r = a1
    elif i == 2:
        r = a2
    else:
        r = a3
    return r


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, o0, o1, o2, o3, l0, l1, l2, l3, H, S, D,
                  o_b, o_h, o_s, l_b, l_h, l_s, p_b, p_h, p_s, pl_b, pl_h, pl_s,
                  N: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < S
    mask = s_ok[:, None] & (d < D)[None, :]
    lse_at = lse_ptr + b.to(tl.int64) * l_b + h * l_h + s * l_s
    out_at = out_ptr + b.to(tl.int64) * o_b + h * o_h + s[:, None].to(tl.int64) * o_s + d[None, :]
    part_lse = b.to(tl.int64) * pl_b + h * pl_h + s * pl_s
    part_out = b.to(tl.int64) * p_b + h * p_h + s[:, None].to(tl.int64) * p_s + d[None, :]
    peak = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    if HAS_STATE:
        lse_a = tl.load(lse_at, mask=s_ok, other=0.0)
        peak = lse_a
    for i in tl.static_range(N):
        peak = tl.maximum(peak, tl.load(_nth(i, l0, l1, l2, l3) + part_lse, mask=s_ok, other=0.0).to(tl.float32))
    peak = tl.where(peak == float("-inf"), 0.0, peak)  # a row over no key yet: every weight 0
    total = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    if HAS_STATE:
        total = tl.exp(lse_a - peak)
        acc = tl.load(out_at, mask=mask, other=0.0) * total[:, None]
    for i in tl.static_range(N):
        w = tl.exp(tl.load(_nth(i, l0, l1, l2, l3) + part_lse, mask=s_ok, other=0.0).to(tl.float32) - peak)
        part = tl.load(_nth(i, o0, o1, o2, o3) + part_out, mask=mask, other=0.0).to(tl.float32)
        acc += part * w[:, None]
        total += w
    some = total > 0.0  # else a row over no key: output 0, log-sum-exp -inf
    total = tl.where(some, total, 1.0)
    tl.store(out_at, tl.where(some[:, None], acc / total[:, None], 0.0), mask=mask)
    tl.store(lse_at, tl.where(some, peak + tl.log(total), float("-inf")), mask=s_ok)


# launched for every four partial results of a staged attention call: without Triton's per-launch binding
launch_merge = Launcher(_merge_kernel)


def merge_supports(state, *parts) -> str | None:
    """Why the kernel cannot merge these (None if it can): it needs a running output in fp32 and
    unit strides along D."""
    if state is not None and (state[0].dtype != torch.float32 or state[1].dtype != torch.float32):
        return f"the running state is {state[0].dtype} / {state[1].dtype}, not fp32"
    if any(out.stride(-1) != 1 for out, _ in ([] if state is None else [state]) + list(parts)):
        return "the outputs are not contiguous along D"
    return None


def _launches(parts) -> list[list]:
    """``parts`` in order, cut into runs that one launch folds in: at most MERGE_PARTS, of one
    output dtype and one set of strides."""
    runs = []
    for _, same in itertools.groupby(parts, key=lambda p: (p[0].dtype, p[0].stride(), p[1].dtype, p[1].stride())):
        same = list(same)
        runs += [same[i : i + MERGE_PARTS] for i in range(0, len(same), MERGE_PARTS)]
    return runs


def merge_triton(state, *parts):
    """Triton twin of :func:`qkv.kernels.attention.merge_torch`: ``parts`` folded into ``state``
    (out [B, H, Sq, D] fp32, lse [B, H, Sq] fp32; updated in place and returned), or into a new
    state when it is None."""
    first = parts[0][0]
    b, h, s, d = first.shape
    fresh = state is None
    if fresh:
        state = (torch.empty(b, h, s, d, dtype=torch.float32, device=first.device),
                 torch.empty(b, h, s, dtype=torch.float32, device=first.device))
    out, lse = state
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(64, 1024 // block_d))  # 8 rows of 128: no spills with four parts (sm_90)
    for run in _launches(parts):
        outs = [p[0] for p in run] + [run[0][0]] * (MERGE_PARTS - len(run))
        lses = [p[1] for p in run] + [run[0][1]] * (MERGE_PARTS - len(run))
        launch_merge[(triton.cdiv(s, block_s), b * h)](
            out, lse, *outs, *lses, h, s, d,
            *out.stride()[:3], *lse.stride(), *run[0][0].stride()[:3], *run[0][1].stride(),
            N=len(run), HAS_STATE=not fresh, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
        fresh = False
    return out, lse
