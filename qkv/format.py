"""The ground floor: plain-data descriptions of how a compressed tensor is stored.

A :class:`TensorFormat` says everything needed to read a compressed tensor back: the head dim, the
codes (bits, block, axis, levels and offset, scale format, word size and bit order) or the float
format values were cast to, the full-precision window, and every smoothing stage with how decoding
undoes it (add stored rows back, or rotate). Components *produce* formats
(``TensorPolicy.format``); kernels, bounds and loading *consume* formats plus tensors and never
need the policy that made them (the way ``torchao``'s ``quantize_affine`` takes plain arguments).

Formats are frozen, hashable, compare by value and round-trip through plain dicts
(:meth:`TensorFormat.to_dict` / :meth:`TensorFormat.from_dict`), which is how files store them.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import torch

from qkv.dtypes import FLOAT_FORMATS, compact_index_dtype
from qkv.errors import ConfigError, ShapeError

MODES = ("sym", "midrise", "asym")
AXES = ("token", "channel")
CAST_FORMATS = ("fp32", "fp16", "bf16")
WORD_BITS = (8, 32)
# The most smoothing stages a format may describe.
MAX_STAGES = 8

Field = tuple[tuple[int, ...], torch.dtype]


def _int(kind: str, key: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{kind}: {key} must be an integer {bound}, got {value!r}")


def _choice(kind: str, key: str, value: object, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{kind}: {key}={value!r} is not supported; valid values: {', '.join(map(str, choices))}")


@dataclasses.dataclass(frozen=True)
class PackFormat:
    """Codes packed along a row as one bit stream in ``word_bits``-bit words (uint8 or int32),
    first code in the high bits (``msb_first``) or the low bits, padded with zero bits."""

    word_bits: int = 8
    msb_first: bool = True

    def __post_init__(self) -> None:
        if self.word_bits not in WORD_BITS or isinstance(self.word_bits, bool):
            raise ConfigError(f"packing: word_bits must be one of {WORD_BITS}, got {self.word_bits!r}")
        if not isinstance(self.msb_first, bool):
            raise ConfigError(f"packing: msb_first must be a bool, got {self.msb_first!r}")

    @property
    def container(self) -> torch.dtype:
        return torch.uint8 if self.word_bits == 8 else torch.int32

    def packed_len(self, n: int, bits: int) -> int:
        """Container elements needed for ``n`` codes of ``bits`` bits."""
        return math.ceil(n * bits / self.word_bits)


@dataclasses.dataclass(frozen=True)
class AffineFormat:
    """Affine integer codes: ``x_hat = (code - offset) * scale + zero`` per block of ``block``
    values along D (``axis="token"``) or along tokens (``axis="channel"``); scales (and zero
    points, ``asym`` only) stored in ``scale`` format relative to a power-of-two multiplier per
    (batch, head) row (none for fp32 scales). See :mod:`qkv.quantizers.affine` for the modes."""

    bits: int
    block: int
    mode: str
    axis: str
    scale: str
    pack: PackFormat = PackFormat()

    def __post_init__(self) -> None:
        kind = f"int{self.bits}"
        _int("quantizer", "bits", self.bits, 1, 8)
        _int(kind, "block", self.block, 1)
        _choice(kind, "mode", self.mode, MODES)
        _choice(kind, "axis", self.axis, AXES)
        _choice(kind, "scale", self.scale, tuple(FLOAT_FORMATS))
        if self.mode == "sym" and self.bits < 2:
            raise ConfigError("int1: mode=sym has no level besides zero; use midrise or asym")
        if not isinstance(self.pack, PackFormat):
            raise ConfigError(f"{kind}: pack must be a PackFormat, got {type(self.pack).__name__}")

    @property
    def levels(self) -> int:
        return 2 * (2 ** (self.bits - 1) - 1) + 1 if self.mode == "sym" else 2**self.bits

    @property
    def offset(self) -> float:
        """Code of the zero level (half-integer for midrise, 0 for asym)."""
        if self.mode == "sym":
            return float(2 ** (self.bits - 1) - 1)
        if self.mode == "midrise":
            return (2**self.bits - 1) / 2
        return 0.0

    @property
    def steps(self) -> float:
        """Scale = range / steps: the block's value range spans this many steps."""
        return float(self.levels - 1) if self.mode == "asym" else self.offset

    @property
    def has_zero(self) -> bool:
        return self.mode == "asym"

    @property
    def has_mult(self) -> bool:
        """Whether scales are stored relative to a per-row power-of-two multiplier."""
        return self.scale != "fp32"

    @property
    def scale_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.scale]


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Groups implied by a token grid (no assignments stored): token ``s`` is frame
    ``s // (height * width)``, row ``(s // width) % height``, column ``s % width``; a group spans
    ``t`` frames x ``h`` rows x ``w`` columns (smaller at the edges)."""

    t: int
    h: int
    w: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for key in ("t", "h", "w", "height", "width"):
            _int("blocks", key, getattr(self, key), 1)

    def frames(self, tokens: int) -> int | None:
        """Whole frames in ``tokens``, or None when they are not whole frames."""
        per_frame = self.height * self.width
        return None if tokens % per_frame else tokens // per_frame

    def num_groups(self, tokens: int) -> int:
        frames = self.frames(tokens)
        if frames is None:
            raise ShapeError(f"blocks: S={tokens} is not a whole number of {self.height}x{self.width} frames")
        return -(-frames // self.t) * -(-self.height // self.h) * -(-self.width // self.w)

    def assignments(self, n: int, tokens: int, device: torch.device) -> torch.Tensor:
        """[n, tokens] int64 group of every token."""
        self.num_groups(tokens)  # whole frames
        s = torch.arange(tokens, device=device)
        f, r, c = s // (self.height * self.width), (s // self.width) % self.height, s % self.width
        nh, nw = -(-self.height // self.h), -(-self.width // self.w)
        group = (f // self.t) * (nh * nw) + (r // self.h) * nw + (c // self.w)
        return group.unsqueeze(0).expand(n, -1)


class Undo(str, enum.Enum):
    """How decoding undoes a smoothing stage."""

    NONE = "none"  # nothing was done
    ADD = "add"  # add back stored rows [B, H, C, D], gathered by assignment
    ROTATE = "rotate"  # the normalized Walsh-Hadamard transform along D (self-inverse)


@dataclasses.dataclass(frozen=True)
class StageFormat:
    """One smoothing stage. ``undo=add``: stored rows [B, H, C, D] in ``rows`` format; each
    token's row is given by stored ``assignments`` [B, H, S_q], else by ``grid`` when it implies
    them, else is row 0 (one stored row, no grouping)."""

    undo: Undo = Undo.NONE
    rows: str = "bf16"
    assignments: bool = False
    grid: BlockGrid | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "undo", Undo(self.undo))
        except ValueError:
            raise ConfigError(
                f"stage: undo={self.undo!r} is not supported; valid values: {', '.join(u.value for u in Undo)}"
            ) from None
        _choice("stage", "rows", self.rows, CAST_FORMATS)
        if not isinstance(self.assignments, bool):
            raise ConfigError(f"stage: assignments must be a bool, got {self.assignments!r}")
        if self.grid is not None and not isinstance(self.grid, BlockGrid):
            raise ConfigError(f"stage: grid must be a BlockGrid, got {type(self.grid).__name__}")
        if (self.assignments or self.grid is not None) and self.undo is not Undo.ADD:
            raise ConfigError("stage: only an add-back stage has assignments or a grid")
        if self.assignments and self.grid is not None:
            raise ConfigError("stage: assignments are stored or implied by a grid, not both")

    @property
    def rows_dtype(self) -> torch.dtype:
        return FLOAT_FORMATS[self.rows]


@dataclasses.dataclass(frozen=True)
class TensorFormat:
    """How one K or V tensor [B, H, S, D] is stored.

    codes: the affine code format, or None when the values are stored cast to ``cast``.
    window: the newest tokens kept in full precision (the input dtype). Per-channel codes also
    keep the tokens that do not fill a block in full precision.
    stages: smoothing stages in encoding order (decoding undoes them last to first).
    """

    head_dim: int
    codes: AffineFormat | None = None
    cast: str | None = None
    window: int = 0
    stages: tuple[StageFormat, ...] = ()

    def __post_init__(self) -> None:
        _int("format", "head_dim", self.head_dim, 1)
        _int("format", "window", self.window, 0)
        object.__setattr__(self, "stages", tuple(self.stages))
        if (self.codes is None) == (self.cast is None):
            raise ConfigError("format: exactly one of codes (affine) and cast (float format) is set")
        if self.cast is not None:
            _choice("format", "cast", self.cast, CAST_FORMATS)
            if self.stages:
                raise ConfigError("format: cast values take no smoothing stages")
            return
        if not isinstance(self.codes, AffineFormat):
            raise ConfigError(f"format: codes must be an AffineFormat, got {type(self.codes).__name__}")
        if not 1 <= len(self.stages) <= MAX_STAGES or not all(isinstance(s, StageFormat) for s in self.stages):
            raise ConfigError(f"format: affine codes take 1 to {MAX_STAGES} stages, got {self.stages!r}")
        if len({s.undo for s in self.stages}) != 1:
            raise ConfigError("format: every stage is undone the same way")
        if self.codes.axis == "token" and self.head_dim % self.codes.block:
            raise ConfigError(
                f"format: int{self.codes.bits} block size {self.codes.block} does not divide head_dim D={self.head_dim}"
            )
        if self.undo is Undo.ROTATE and self.head_dim & (self.head_dim - 1):
            raise ConfigError(f"format: the hadamard rotation needs head_dim D a power of two, got {self.head_dim}")

    @property
    def undo(self) -> Undo:
        """How every stage is undone (NONE for cast values)."""
        return self.stages[0].undo if self.stages else Undo.NONE

    @property
    def cast_dtype(self) -> torch.dtype | None:
        return None if self.cast is None else FLOAT_FORMATS[self.cast]

    def quantized_length(self, tokens: int) -> int:
        """How many of ``tokens`` are stored as codes (or cast); the rest stay full precision."""
        return quantized_length(tokens, self.window, self.codes)

    def layout(self, shape: tuple[int, int, int, int], dtype: torch.dtype, groups: list[int]) -> dict[str, Field]:
        """Shape and dtype of every tensor stored for an input of ``shape`` / ``dtype``, by name
        (as ``CompressedTensor.tensors()`` names them); ``groups``: stored rows per stage."""
        b, h, s, d = shape
        s_q = self.quantized_length(s)
        out: dict[str, Field] = {}
        if s_q and self.cast is not None:
            out["codes"] = ((b, h, s_q, d), self.cast_dtype)
        elif s_q:
            q = self.codes
            rows, length = (s_q, d) if q.axis == "token" else (d, s_q)
            out["codes"] = ((b, h, rows, q.pack.packed_len(length, q.bits)), q.pack.container)
            out["scales"] = ((b, h, rows, length // q.block), q.scale_dtype)
            if q.has_zero:
                out["zeros"] = out["scales"]
            if q.has_mult:
                out["scale_mult"] = ((b, h), torch.float32)
            for i, (stage, c) in enumerate(zip(self.stages, groups)):
                if stage.undo is Undo.ADD:
                    out[f"stage{i}.centroids"] = ((b, h, c, d), stage.rows_dtype)
                    if stage.assignments:
                        out[f"stage{i}.assignments"] = ((b, h, s_q), compact_index_dtype(c))
        if s_q < s:
            out["fp_tokens"] = ((b, h, s - s_q, d), dtype)
        return out

    # -- plain dicts (how files store a format) ------------------------------------------------
    def to_dict(self) -> dict:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: object) -> "TensorFormat":
        """Inverse of :meth:`to_dict`; raises :class:`ConfigError` naming what does not fit."""
        if not isinstance(data, dict):
            raise ConfigError(f"format: expected a dict, got {type(data).__name__}")
        try:
            codes = data.get("codes")
            if codes is not None:
                codes = AffineFormat(**{**_fields(codes, AffineFormat), "pack": PackFormat(**_fields(codes.get("pack"), PackFormat))})
            stages = data.get("stages", [])
            if not isinstance(stages, list) or len(stages) > MAX_STAGES:
                raise ConfigError(f"format: stages must be a list of at most {MAX_STAGES}")
            built = []
            for stage in stages:
                fields = _fields(stage, StageFormat)
                if fields.get("grid") is not None:
                    fields["grid"] = BlockGrid(**_fields(fields["grid"], BlockGrid))
                built.append(StageFormat(**fields))
            rest = {k: v for k, v in _fields(data, cls).items() if k not in ("codes", "stages")}
            return cls(codes=codes, stages=tuple(built), **rest)
        except TypeError as exc:
            raise ConfigError(f"format: {exc}") from None


def quantized_length(tokens: int, window: int, codes: AffineFormat | None) -> int:
    """How many of ``tokens`` are stored as codes (or cast) with a full-precision ``window``:
    per-channel codes also keep the tokens that do not fill a block in full precision."""
    n = max(tokens - window, 0)
    if codes is not None and codes.axis == "channel":
        n -= n % codes.block
    return n


def _fields(data: object, cls: type) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"format: {cls.__name__} must be a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"format: {cls.__name__} has no field(s) {sorted(unknown)}")
    return dict(data)


def _to_plain(value: object) -> object:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value
