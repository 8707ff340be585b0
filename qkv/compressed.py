"""Compressed K/V data: typed containers that describe themselves (a :class:`~qkv.format.TensorFormat`
per tensor) and know their exact size, component by component. Reading them back - decoding,
bounds, loading - needs the data alone, never the policy that made it."""

from __future__ import annotations

import dataclasses
import os

import torch

from qkv import io
from qkv.dtypes import INPUT_DTYPES
from qkv.errors import CorruptDataError, QKVError
from qkv.format import TensorFormat

# The components every compressed tensor reports, in this order.
COMPONENTS = ("codes", "scales", "zeros", "centroids", "assignments", "fp_tokens")


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclasses.dataclass(frozen=True)
class StageData:
    """One smoothing stage. centroids: [B, H, C, D] (stored format) or None; assignments:
    [B, H, S_q] uint8/int16/int32, or None when there are none or the grouper implies them."""

    centroids: torch.Tensor | None
    assignments: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    """One compressed K or V tensor of ``shape`` [B, H, S, D], stored as ``format`` says.

    The first ``quantized_tokens`` tokens (S_q) are quantized; the rest are ``fp_tokens``
    [B, H, S - S_q, D] kept in the input dtype (a full-precision window, or the tail that does not
    fill a per-channel block).

    codes: packed codes [B, H, R, P] (R = S_q for per-token blocks, R = D for per-channel
        blocks), or the values themselves [B, H, S_q, D] for a float-cast policy; None if S_q = 0.
    scales / zeros: [B, H, R, blocks per row] in the scale format; zeros only when asymmetric.
    scale_mult: [B, H] fp32 powers of two that scales and zeros are relative to (None for fp32).
    stages: per smoothing stage, its centroids and assignments.
    """

    format: TensorFormat
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    quantized_tokens: int
    codes: torch.Tensor | None
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    scale_mult: torch.Tensor | None
    stages: tuple[StageData, ...]
    fp_tokens: torch.Tensor | None

    def component_nbytes(self) -> dict[str, int]:
        """Exact bytes stored per component: codes, scales (with multipliers), zeros, centroids,
        assignments, fp_tokens."""
        return {
            "codes": _nbytes(self.codes),
            "scales": _nbytes(self.scales) + _nbytes(self.scale_mult),
            "zeros": _nbytes(self.zeros),
            "centroids": sum(_nbytes(s.centroids) for s in self.stages),
            "assignments": sum(_nbytes(s.assignments) for s in self.stages),
            "fp_tokens": _nbytes(self.fp_tokens),
        }

    @property
    def nbytes(self) -> int:
        """Exact bytes of everything stored."""
        return sum(self.component_nbytes().values())

    @property
    def numel(self) -> int:
        b, h, s, d = self.shape
        return b * h * s * d

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / self.numel

    def to(self, device: str | torch.device) -> "CompressedTensor":
        """A copy with every stored tensor on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            codes=move(self.codes),
            scales=move(self.scales),
            zeros=move(self.zeros),
            scale_mult=move(self.scale_mult),
            stages=tuple(StageData(move(s.centroids), move(s.assignments)) for s in self.stages),
            fp_tokens=move(self.fp_tokens),
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by a stable name (``codes``, ``stage0.centroids``, ...)."""
        out = {
            name: t
            for name, t in (
                ("codes", self.codes),
                ("scales", self.scales),
                ("zeros", self.zeros),
                ("scale_mult", self.scale_mult),
                ("fp_tokens", self.fp_tokens),
            )
            if t is not None
        }
        for i, stage in enumerate(self.stages):
            if stage.centroids is not None:
                out[f"stage{i}.centroids"] = stage.centroids
            if stage.assignments is not None:
                out[f"stage{i}.assignments"] = stage.assignments
        return out

    def stage_assignments(self, i: int) -> torch.Tensor:
        """[B*H, S_q] row of every quantized token in add-back stage ``i``: stored, implied by the
        stage's grid, or row 0 (one stored row)."""
        stage, data = self.format.stages[i], self.stages[i]
        n = self.shape[0] * self.shape[1]
        if data.assignments is not None:
            return data.assignments.flatten(0, 1)
        device = data.centroids.device
        if stage.grid is not None:
            return stage.grid.assignments(n, self.quantized_tokens, device)
        return torch.zeros(n, self.quantized_tokens, dtype=torch.long, device=device)

    @property
    def groups(self) -> list[int]:
        """Stored rows (centroids) per stage."""
        return [0 if s.centroids is None else s.centroids.shape[2] for s in self.stages]

    def check(self, name: str = "x") -> None:
        """Raise :class:`CorruptDataError` unless every stored tensor is exactly what the format
        stores for this shape (names, shapes, dtypes, stage count, groups, assignment range)."""
        fmt = self.format
        if len(self.shape) != 4 or min(self.shape) < 1 or self.shape[3] != fmt.head_dim:
            raise CorruptDataError(f"{name}: invalid shape {self.shape} for head_dim {fmt.head_dim}")
        s_q = fmt.quantized_length(self.shape[2])
        if self.quantized_tokens != s_q:
            raise CorruptDataError(f"{name}: {self.quantized_tokens} quantized tokens, the format gives {s_q}")
        stages = len(fmt.stages) if s_q else 0
        if len(self.stages) != stages:
            raise CorruptDataError(f"{name}: {len(self.stages)} stages stored, the format has {stages}")
        groups = self.groups
        for i, (stage, c) in enumerate(zip(fmt.stages, groups)):
            cents = self.stages[i].centroids
            if cents is not None and (cents.dim() != 4 or not 1 <= c <= max(s_q, 1)):
                raise CorruptDataError(f"{name}.stage{i}.centroids: invalid shape {tuple(cents.shape)}")
            if stage.grid is not None and cents is not None:
                frames = stage.grid.frames(s_q)
                implied = None if frames is None else stage.grid.num_groups(s_q)
                if c != implied:
                    raise CorruptDataError(f"{name}.stage{i}.centroids: {c} groups, the grid implies {implied}")
            if stage.undo.value == "add" and not stage.assignments and stage.grid is None and c != 1:
                raise CorruptDataError(f"{name}.stage{i}.centroids: {c} rows without assignments, expected 1")
        expected = fmt.layout(self.shape, self.dtype, groups)
        stored = self.tensors()
        for field in sorted(set(expected) | set(stored)):
            where = f"{name}.{field}"
            if field not in stored:
                raise CorruptDataError(f"{where}: missing")
            if field not in expected:
                raise CorruptDataError(f"{where}: present but the format stores none")
            size, dtype = expected[field]
            t = stored[field]
            if tuple(t.shape) != tuple(size) or t.dtype != dtype:
                raise CorruptDataError(f"{where}: expected shape {tuple(size)} {dtype}, found {tuple(t.shape)} {t.dtype}")
        for i, stage in enumerate(self.stages):
            if stage.assignments is not None:
                a = stage.assignments.long()
                if bool((a < 0).any()) or bool((a >= groups[i]).any()):
                    raise CorruptDataError(f"{name}.stage{i}.assignments: indices outside [0, {groups[i]})")


@dataclasses.dataclass(frozen=True)
class CompressedKV:
    """Compressed keys and values of one span, plus the spec of the policy that made them."""

    k: CompressedTensor
    v: CompressedTensor
    spec: str

    @property
    def nbytes(self) -> int:
        """Exact bytes of everything stored, keys and values."""
        return self.k.nbytes + self.v.nbytes

    def component_nbytes(self) -> dict[str, int]:
        """Bytes per component, keys and values added up."""
        kb, vb = self.k.component_nbytes(), self.v.component_nbytes()
        return {name: kb[name] + vb[name] for name in kb}

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / (self.k.numel + self.v.numel)

    def to(self, device: str | torch.device) -> "CompressedKV":
        """A copy with every stored tensor on ``device``."""
        return CompressedKV(self.k.to(device), self.v.to(device), self.spec)

    def save(self, path: str | os.PathLike) -> None:
        """Write to a signed safetensors file (:mod:`qkv.io`): every stored tensor, and each
        tensor's shape, dtype and format."""
        tensors = {f"{side}.{name}": t for side, ct in (("k", self.k), ("v", self.v)) for name, t in ct.tensors().items()}
        header = {"spec": self.spec, "k": _header(self.k), "v": _header(self.v)}
        io.write(path, FILE_KIND, FILE_VERSION, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "CompressedKV":
        """Read a file written by :meth:`save`. Its checksum, its header and every stored tensor
        are checked against the stored formats (no policy is needed); a damaged, edited or
        mismatched file raises :class:`CorruptDataError`."""
        tensors, header, _ = io.read(path, FILE_KIND, FILE_VERSION)
        where = os.fspath(path)
        try:
            k = _tensor_from("k", header["k"], tensors)
            v = _tensor_from("v", header["v"], tensors)
            spec = header["spec"]
            if not isinstance(spec, str):
                raise TypeError("spec is not a string")
        except (QKVError, KeyError, ValueError, TypeError) as exc:
            if isinstance(exc, CorruptDataError):
                raise CorruptDataError(f"{where}: {exc}") from None
            raise CorruptDataError(f"{where}: inconsistent header ({type(exc).__name__}: {exc})") from None
        if tensors:
            raise CorruptDataError(f"{where}: unexpected tensors {sorted(tensors)[:5]}")
        return CompressedKV(k.to(device), v.to(device), spec)


FILE_KIND = "qkv.compressed_kv"
FILE_VERSION = "2"
_DTYPES = {str(d): d for d in INPUT_DTYPES}


def _header(ct: CompressedTensor) -> dict:
    return {
        "shape": list(ct.shape),
        "dtype": str(ct.dtype),
        "quantized_tokens": ct.quantized_tokens,
        "stages": len(ct.stages),
        "format": ct.format.to_dict(),
    }


def _tensor_from(side: str, header: dict, tensors: dict[str, torch.Tensor]) -> CompressedTensor:
    """The :class:`CompressedTensor` ``side`` ("k" / "v") of a loaded file, checked (pops its tensors)."""
    fmt = TensorFormat.from_dict(header["format"])
    shape = tuple(header["shape"])
    if len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) for x in shape):
        raise CorruptDataError(f"{side}: invalid shape {shape!r}")
    if header["dtype"] not in _DTYPES:
        raise CorruptDataError(f"{side}: unknown original dtype {header['dtype']!r}")
    stages = header["stages"]
    if stages not in (0, len(fmt.stages)):
        raise CorruptDataError(f"{side}: {stages!r} stages stored, the format has {len(fmt.stages)}")

    def get(name: str) -> torch.Tensor | None:
        return tensors.pop(f"{side}.{name}", None)

    ct = CompressedTensor(
        format=fmt,
        shape=shape,
        dtype=_DTYPES[header["dtype"]],
        quantized_tokens=header["quantized_tokens"],
        codes=get("codes"),
        scales=get("scales"),
        zeros=get("zeros"),
        scale_mult=get("scale_mult"),
        stages=tuple(StageData(get(f"stage{i}.centroids"), get(f"stage{i}.assignments")) for i in range(stages)),
        fp_tokens=get("fp_tokens"),
    )
    ct.check(side)
    return ct
