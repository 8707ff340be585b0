"""The exact layout (shape and dtype of every stored tensor) a policy produces for a given input.

One description serves two purposes: checking loaded data field by field (so damaged or edited
files fail with a message naming the field instead of decoding garbage), and predicting the exact
size of a compressed tensor before compressing it (to fit a policy to a bit budget).
"""

from __future__ import annotations

import math

import torch

from qkv.caches.compressed import CompressedTensor
from qkv.caches.policy import TensorPolicy
from qkv.errors import CorruptDataError
from qkv.quantizers import AffineQuantizer, CastQuantizer
from qkv.dtypes import compact_index_dtype

Field = tuple[tuple[int, ...], torch.dtype]


def predicted_groups(policy: TensorPolicy, tokens: int) -> int:
    """Groups per stage a fresh (not warm-started) compression of ``tokens`` tokens makes."""
    if not policy.smoothing.needs_groups or not tokens:
        return 0
    grouping = policy.grouping
    if grouping.has_param("clusters"):
        return min(grouping.clusters, tokens)
    return grouping.num_groups(tokens)


def expected_layout(
    policy: TensorPolicy, shape: tuple[int, int, int, int], dtype: torch.dtype, groups: list[int]
) -> dict[str, Field]:
    """Every tensor ``policy`` stores for an input of ``shape``/``dtype``, by name (as in
    ``CompressedTensor.tensors()``); ``groups``: centroids per stage."""
    b, h, s, d = shape
    s_q = policy.quantized_length(s)
    q = policy.quantizer
    out: dict[str, Field] = {}
    if s_q and isinstance(q, CastQuantizer):
        out["codes"] = ((b, h, s_q, d), q.storage_dtype)
    elif s_q:
        assert isinstance(q, AffineQuantizer)
        rows, length = (s_q, d) if q.axis == "token" else (d, s_q)
        out["codes"] = ((b, h, rows, policy.packing.packed_len(length, q.bits)), policy.packing.container)
        out["scales"] = ((b, h, rows, length // q.block), q.scale_dtype)
        if q.has_zero:
            out["zeros"] = out["scales"]
        if q.scale != "fp32":
            out["scale_mult"] = ((b, h), torch.float32)
        if policy.smoothing.additive:
            for i, c in enumerate(groups):
                out[f"stage{i}.centroids"] = ((b, h, c, d), policy.smoothing.storage_dtype)
                if policy.grouping.stores_assignments:
                    out[f"stage{i}.assignments"] = ((b, h, s_q), compact_index_dtype(c))
    if s_q < s:
        out["fp_tokens"] = ((b, h, s - s_q, d), dtype)
    return out


def predicted_nbytes(policy: TensorPolicy, shape: tuple[int, int, int, int], dtype: torch.dtype) -> int:
    """Exact bytes ``policy.compress`` stores for a tensor of ``shape`` (without warm start)."""
    s_q = policy.quantized_length(shape[2])
    stages = policy.staging.count if s_q and isinstance(policy.quantizer, AffineQuantizer) else 0
    layout = expected_layout(policy, shape, dtype, [predicted_groups(policy, s_q)] * stages)
    return sum(math.prod(size) * torch.empty((), dtype=dt).element_size() for size, dt in layout.values())


def check_layout(policy: TensorPolicy, ct: CompressedTensor, name: str) -> None:
    """Raise :class:`CorruptDataError` unless ``ct`` is exactly what ``policy`` produces."""
    if len(ct.shape) != 4 or min(ct.shape) < 1:
        raise CorruptDataError(f"{name}: invalid shape {ct.shape}")
    s_q = policy.quantized_length(ct.shape[2])
    if ct.quantized_tokens != s_q:
        raise CorruptDataError(f"{name}: {ct.quantized_tokens} quantized tokens, policy gives {s_q}")
    stages = policy.staging.count if s_q and isinstance(policy.quantizer, AffineQuantizer) else 0
    if len(ct.stages) != stages:
        raise CorruptDataError(f"{name}: {len(ct.stages)} stages stored, policy has {stages}")
    groups = []
    for i, stage in enumerate(ct.stages):
        cents = stage.centroids
        if cents is not None and (cents.dim() != 4 or not 1 <= cents.shape[2] <= max(s_q, 1)):
            raise CorruptDataError(f"{name}.stage{i}.centroids: invalid shape {tuple(cents.shape)}")
        groups.append(0 if cents is None else cents.shape[2])
        if policy.smoothing.additive and not policy.grouping.stores_assignments and cents is not None:
            implied = policy.grouping.num_groups(s_q)
            if groups[-1] != implied:
                raise CorruptDataError(f"{name}.stage{i}.centroids: {groups[-1]} groups, the grid implies {implied}")
    expected = expected_layout(policy, ct.shape, ct.dtype, groups)
    stored = ct.tensors()
    for field in sorted(set(expected) | set(stored)):
        where = f"{name}.{field}"
        if field not in stored:
            raise CorruptDataError(f"{where}: missing")
        if field not in expected:
            raise CorruptDataError(f"{where}: present but this policy stores none")
        size, dtype = expected[field]
        t = stored[field]
        if tuple(t.shape) != tuple(size) or t.dtype != dtype:
            raise CorruptDataError(f"{where}: expected shape {tuple(size)} {dtype}, found {tuple(t.shape)} {t.dtype}")
    for i, stage in enumerate(ct.stages):
        if stage.assignments is not None:
            a = stage.assignments.long()
            if bool((a < 0).any()) or bool((a >= groups[i]).any()):
                raise CorruptDataError(f"{name}.stage{i}.assignments: indices outside [0, {groups[i]})")
