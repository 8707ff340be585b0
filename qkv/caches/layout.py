"""What a :class:`CompressedTensor` made by a given policy must look like, checked field by field.

Used when loading files, so that damaged or hand-edited data fails with a message naming the
field instead of producing garbage (or an index error) at decode time.
"""

from __future__ import annotations

import torch

from qkv.caches.compressed import CompressedTensor
from qkv.caches.policy import TensorPolicy
from qkv.errors import CorruptDataError
from qkv.quantizers import AffineQuantizer, CastQuantizer
from qkv.quantizers.staging import compact_index_dtype


def _expect(name: str, t: torch.Tensor | None, shape: tuple | None, dtype: torch.dtype | None) -> None:
    if shape is None:
        if t is not None:
            raise CorruptDataError(f"{name}: present but this policy stores none")
        return
    if t is None:
        raise CorruptDataError(f"{name}: missing")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise CorruptDataError(
            f"{name}: expected shape {tuple(shape)} {dtype}, found {tuple(t.shape)} {t.dtype}"
        )


def check_layout(policy: TensorPolicy, ct: CompressedTensor, name: str) -> None:
    """Raise :class:`CorruptDataError` unless ``ct`` is exactly what ``policy`` produces."""
    if len(ct.shape) != 4 or min(ct.shape) < 1:
        raise CorruptDataError(f"{name}: invalid shape {ct.shape}")
    b, h, s, d = ct.shape
    s_q = policy.quantized_length(s)
    if ct.quantized_tokens != s_q:
        raise CorruptDataError(f"{name}: {ct.quantized_tokens} quantized tokens, policy gives {s_q}")
    q = policy.quantizer
    codes = scales = mult = zeros = None
    stages = 0
    if s_q and isinstance(q, CastQuantizer):
        codes = ((b, h, s_q, d), q.storage_dtype)
    elif s_q:
        assert isinstance(q, AffineQuantizer)
        rows, length = (s_q, d) if q.axis == "token" else (d, s_q)
        codes = ((b, h, rows, policy.packing.packed_len(length, q.bits)), policy.packing.container)
        scales = ((b, h, rows, length // q.block), q.scale_dtype)
        zeros = scales if q.has_zero else None
        mult = ((b, h), torch.float32) if q.scale != "fp32" else None
        stages = policy.staging.count
    for field, spec in (("codes", codes), ("scales", scales), ("zeros", zeros), ("scale_mult", mult)):
        _expect(f"{name}.{field}", getattr(ct, field), *(spec or (None, None)))
    rest = s - s_q
    _expect(f"{name}.fp_tokens", ct.fp_tokens, (b, h, rest, d) if rest else None, ct.dtype)
    if len(ct.stages) != stages:
        raise CorruptDataError(f"{name}: {len(ct.stages)} stages stored, policy has {stages}")
    for i, stage in enumerate(ct.stages):
        where = f"{name}.stage{i}"
        cents = stage.centroids
        if not policy.smoothing.additive:
            _expect(f"{where}.centroids", cents, None, None)
            _expect(f"{where}.assignments", stage.assignments, None, None)
            continue
        if cents is None or cents.dim() != 4 or cents.shape[:2] != (b, h) or cents.shape[3] != d:
            raise CorruptDataError(f"{where}.centroids: expected [{b}, {h}, C, {d}]")
        _expect(f"{where}.centroids", cents, tuple(cents.shape), policy.smoothing.storage_dtype)
        groups = cents.shape[2]
        if policy.grouping.stores_assignments:
            _expect(f"{where}.assignments", stage.assignments, (b, h, s_q), compact_index_dtype(groups))
            a = stage.assignments.long()
            if bool((a < 0).any()) or bool((a >= groups).any()):
                raise CorruptDataError(f"{where}.assignments: indices outside [0, {groups})")
        else:
            _expect(f"{where}.assignments", stage.assignments, None, None)
            implied = policy.grouping.num_groups(s_q)
            if groups != implied:
                raise CorruptDataError(f"{where}.centroids: {groups} groups, the grid implies {implied}")
