"""Compressed K/V data: typed containers that describe themselves (a :class:`~qkv.format.TensorFormat`
per tensor) and know their exact size, component by component. Reading them back - decoding,
bounds, loading - needs the data alone, never the policy that made it."""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from qkv import io
from qkv.dtypes import INPUT_DTYPES
from qkv.errors import ConfigError, CorruptDataError, QKVError, ShapeError, shown
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

    @property
    def device(self) -> torch.device:
        """Where the stored tensors are."""
        return (self.codes if self.codes is not None else self.fp_tokens).device

    def to(self, device: str | torch.device) -> "CompressedTensor":
        """A copy with every stored tensor on ``device``."""
        return self.mapped(lambda t: t.to(device))

    def mapped(self, fn) -> "CompressedTensor":
        """This tensor with ``fn`` applied to every stored tensor (``torch.clone``: a copy)."""

        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return dataclasses.replace(
            self,
            codes=apply(self.codes),
            scales=apply(self.scales),
            zeros=apply(self.zeros),
            scale_mult=apply(self.scale_mult),
            stages=tuple(StageData(apply(s.centroids), apply(s.assignments)) for s in self.stages),
            fp_tokens=apply(self.fp_tokens),
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

    def droppable(self, tokens: int) -> int:
        """How many of the first ``tokens`` tokens (at most S) :meth:`drop_leading` can drop without
        touching the others: all of them where each token is stored on its own (per-token codes,
        cast values, per-token assignments, full-precision tokens); per-channel blocks (KIVI's keys)
        only whole blocks whose codes fill whole words (the rest share scales and words with kept
        tokens); none where a block grid implies the groups from the tokens' positions."""
        fmt = self.format
        if tokens >= self.quantized_tokens:
            return tokens
        if any(st.grid is not None for st in fmt.stages):
            return 0
        if fmt.codes is None or fmt.codes.axis == "token":
            return tokens
        q = fmt.codes
        unit = q.block * q.pack.word_bits // math.gcd(q.block * q.bits, q.pack.word_bits)
        return tokens - tokens % unit

    def drop_leading(self, tokens: int) -> "CompressedTensor":
        """This tensor without its first ``tokens`` tokens, in storage of its own (what is dropped
        is freed once the old tensor goes); ``tokens`` must be :meth:`droppable`. Centroids are
        kept whole (the same tensors): every kept token may refer to any of them."""
        if not 0 <= tokens < self.shape[2] or self.droppable(tokens) != tokens:
            raise ShapeError(f"cannot drop the first {tokens} of {self.shape[2]} tokens of {self.format}")
        b, h, s, d = self.shape
        fmt = self.format
        kept_q = fmt.quantized_length(s - tokens)
        gone = self.quantized_tokens - kept_q  # quantized tokens dropped; the rest of ``tokens`` are fp

        def rows(t: torch.Tensor | None, start: int) -> torch.Tensor | None:
            return None if t is None or not kept_q else t[..., start:, :].clone()

        codes = scales = zeros = None
        if kept_q and (fmt.cast is not None or fmt.codes.axis == "token"):
            codes, scales, zeros = rows(self.codes, gone), rows(self.scales, gone), rows(self.zeros, gone)
        elif kept_q:  # per-channel: [B, H, D, words] codes, [B, H, D, blocks] scales and zeros
            q = fmt.codes
            words, blocks = gone * q.bits // q.pack.word_bits, gone // q.block
            codes = self.codes[..., words:].clone()
            scales = self.scales[..., blocks:].clone()
            zeros = None if self.zeros is None else self.zeros[..., blocks:].clone()
        stages = ()
        if kept_q:
            stages = tuple(
                StageData(st.centroids, None if st.assignments is None else st.assignments[..., gone:].clone())
                for st in self.stages
            )
        fp = self.fp_tokens
        if fp is not None:
            fp = fp[:, :, tokens - gone :].clone() if fp.shape[2] > tokens - gone else None
        return dataclasses.replace(
            self,
            shape=(b, h, s - tokens, d),
            quantized_tokens=kept_q,
            codes=codes,
            scales=scales,
            zeros=zeros,
            scale_mult=self.scale_mult if kept_q else None,
            stages=stages,
            fp_tokens=fp,
        )

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
            # at most one row per token when compressed, more once leading tokens were dropped
            if cents is not None and (cents.dim() != 4 or c < 1):
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

    def drop_leading(self, tokens: int) -> tuple["CompressedKV", int]:
        """Keys and values without as many of their first ``tokens`` tokens as both can drop
        (:meth:`CompressedTensor.droppable`): (the data, tokens dropped); the data itself when
        none can be."""
        n = tokens
        while (m := min(self.k.droppable(n), self.v.droppable(n))) != n:
            n = m
        if not n:
            return self, 0
        return CompressedKV(self.k.drop_leading(n), self.v.drop_leading(n), self.spec), n

    def save(self, path: str | os.PathLike) -> str:
        """Write to a signed safetensors file (:mod:`qkv.io`; the folder must exist): every stored
        tensor, and each tensor's shape, dtype, quantized tokens and format. Returns the file's
        digest."""
        tensors = {f"{side}.{name}": t for side, ct in (("k", self.k), ("v", self.v)) for name, t in ct.tensors().items()}
        header = {"spec": self.spec, "k": tensor_header(self.k), "v": tensor_header(self.v)}
        return io.write(path, FILE_KIND, FILE_VERSION, tensors, header)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "CompressedKV":
        """Read a file written by :meth:`save` onto ``device`` (see :func:`load_compressed` for
        what is checked; no policy is needed)."""
        return load_compressed(path, device)[0]


FILE_KIND = "qkv.compressed_kv"
FILE_VERSION = "3"
DTYPES = {str(d): d for d in INPUT_DTYPES}


def tensor_header(ct: CompressedTensor) -> dict:
    """What a file records of ``ct`` besides its tensors."""
    return {
        "shape": list(ct.shape),
        "dtype": str(ct.dtype),
        "quantized_tokens": ct.quantized_tokens,
        "stages": len(ct.stages),
        "format": ct.format.to_dict(),
    }


def read_tensor_header(header: object, where: str) -> tuple[TensorFormat, tuple[int, int, int, int], torch.dtype, int, int]:
    """(format, shape, dtype, quantized tokens, stages) of a :func:`tensor_header`, every field
    checked for type and range before anything is built from it."""
    try:
        fmt = TensorFormat.from_dict(io.field(header, "format", dict, where))
    except ConfigError as exc:
        raise CorruptDataError(f"{where}.format: {exc}") from None
    shape = io.field(header, "shape", list, where)
    if len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape):
        raise CorruptDataError(f"{where}.shape: expected 4 positive integers, found {shown(shape)}")
    dtype = io.field(header, "dtype", str, where)
    if dtype not in DTYPES:
        raise CorruptDataError(f"{where}.dtype: {shown(dtype)} is not one of {', '.join(DTYPES)}")
    tokens = io.int_field(header, "quantized_tokens", 0, shape[2], where)
    stages = io.int_field(header, "stages", 0, len(fmt.stages), where)
    return fmt, tuple(shape), DTYPES[dtype], tokens, stages


def _tensor_from(side: str, header: object, tensors: dict[str, torch.Tensor], where: str) -> CompressedTensor:
    """The :class:`CompressedTensor` ``side`` ("k" / "v") of a loaded file (pops its tensors),
    checked against its format, with no NaN stored (nor Inf, but in values cast to a narrower
    float format, where an overflow to Inf is what compression stored)."""
    fmt, shape, dtype, tokens, stages = read_tensor_header(header, f"{where}: {side}")

    def get(name: str) -> torch.Tensor | None:
        return tensors.pop(f"{side}.{name}", None)

    ct = CompressedTensor(
        format=fmt,
        shape=shape,
        dtype=dtype,
        quantized_tokens=tokens,
        codes=get("codes"),
        scales=get("scales"),
        zeros=get("zeros"),
        scale_mult=get("scale_mult"),
        stages=tuple(StageData(get(f"stage{i}.centroids"), get(f"stage{i}.assignments")) for i in range(stages)),
        fp_tokens=get("fp_tokens"),
    )
    try:
        ct.check(f"{where}: {side}")
    except CorruptDataError:
        raise
    except QKVError as exc:  # e.g. a block grid that the stored token count does not fit
        raise CorruptDataError(f"{where}: {side}: {exc}") from None
    for name, t in ct.tensors().items():
        io.check_stored(f"{where}: {side}.{name}", t, inf_ok=name == "codes" and fmt.cast is not None)
    return ct


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[CompressedKV, str]:
    """Read and verify a file written by :meth:`CompressedKV.save`: (data on ``device``, digest).

    Checked: the digest; every header field (type and range, before anything is built from it);
    that every tensor has exactly the shape and dtype its stored format gives for that header
    (assignments in range); that no stored float is NaN or Inf (Inf allowed in cast values). A
    truncated, damaged, edited (even re-signed) or mismatched file raises
    :class:`CorruptDataError`; the spec is a label and builds nothing.
    """
    device = io.load_device(device)
    tensors, header, sha = io.read(path, FILE_KIND, FILE_VERSION)
    where = shown(os.fspath(path))
    spec = io.field(header, "spec", str, where)
    k = _tensor_from("k", header.get("k"), tensors, where)
    v = _tensor_from("v", header.get("v"), tensors, where)
    if tensors:
        raise CorruptDataError(f"{where}: unexpected tensors {shown(sorted(tensors)[:5])}")
    return CompressedKV(k.to(device), v.to(device), spec), sha


# Every tensor of a packed buffer starts at a multiple of this many bytes (any dtype's alignment).
PACK_ALIGN = 16


class PackedBytes:
    """Byte pieces appended back to back, each starting at a multiple of :data:`PACK_ALIGN`."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, raw: torch.Tensor) -> int:
        """Append the uint8 bytes ``raw``; returns the offset they start at."""
        pad = -self.size % PACK_ALIGN
        if pad:
            self.parts.append(raw.new_zeros(pad))
            self.size += pad
        self.parts.append(raw)
        self.size += raw.numel()
        return self.size - raw.numel()

    def add_tensor(self, t: torch.Tensor) -> int:
        """Append ``t``'s bytes (contiguous); returns the offset they start at."""
        return self.add(t.contiguous().view(torch.uint8).view(-1) if t.numel() else t.new_empty(0, dtype=torch.uint8))

    def buffer(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Every piece as one uint8 tensor (empty, on ``device``, when nothing was added)."""
        return torch.cat(self.parts) if self.parts else torch.empty(0, dtype=torch.uint8, device=device)


def pack(ckv: CompressedKV) -> tuple[torch.Tensor, dict]:
    """``ckv`` as one contiguous uint8 buffer on its device (every stored tensor back to back,
    each :data:`PACK_ALIGN`-aligned) and a JSON-able header saying what is where: the form to send
    between ranks or copy to host memory in one transfer. :func:`unpack` is its exact inverse."""
    data, entries = PackedBytes(), []
    for side, ct in (("k", ckv.k), ("v", ckv.v)):
        for name, t in ct.tensors().items():
            entries.append([f"{side}.{name}", str(t.dtype), list(t.shape), data.add_tensor(t)])
    device = next(iter(ckv.k.tensors().values())).device
    header = {"spec": ckv.spec, "k": tensor_header(ckv.k), "v": tensor_header(ckv.v), "tensors": entries}
    return data.buffer(device), header


_STORED_DTYPES = {
    str(d): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.uint8, torch.int16, torch.int32, torch.int64)
}


def unpack(buffer: torch.Tensor, header: dict) -> CompressedKV:
    """The :class:`CompressedKV` a :func:`pack` made (its own copies of the bytes, on the buffer's
    device), checked like a loaded file: every header field, every tensor against its format, no
    NaN stored; a buffer or header that does not fit raises :class:`CorruptDataError`."""
    where = "packed span"
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise CorruptDataError(f"{where}: the buffer must be a 1-d uint8 tensor, got {shown(getattr(buffer, 'shape', buffer))}")
    tensors = {}
    for entry in io.field(header, "tensors", list, where):
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str) and entry[1] in _STORED_DTYPES
                and isinstance(entry[2], list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in entry[2])
                and isinstance(entry[3], int) and not isinstance(entry[3], bool) and entry[3] >= 0):
            raise CorruptDataError(f"{where}: invalid tensor entry {shown(entry)}")
        name, dtype, shape, offset = entry
        dtype = _STORED_DTYPES[dtype]
        size = math.prod(shape) * dtype.itemsize
        if offset % PACK_ALIGN or offset + size > buffer.numel() or name in tensors:
            raise CorruptDataError(f"{where}: {shown(name)} at bytes {offset}..{offset + size} does not fit a buffer of {buffer.numel()}")
        tensors[name] = buffer[offset : offset + size].clone().view(dtype).view(shape)
    spec = io.field(header, "spec", str, where)
    k = _tensor_from("k", header.get("k"), tensors, where)
    v = _tensor_from("v", header.get("v"), tensors, where)
    if tensors:
        raise CorruptDataError(f"{where}: unexpected tensors {shown(sorted(tensors)[:5])}")
    return CompressedKV(k, v, spec)
