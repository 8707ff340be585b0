"""Per-device tile and launch choices of the Triton kernels.

A kernel's choices on a GPU are looked up by the device's name (``torch.cuda.get_device_name``)
in ``tiles.json`` next to this module, which ``benchmarks/tune_tiles.py`` writes from a sweep on
that GPU (``--write``); a GPU the table does not name gets the kernel's defaults, the interpreter
its own small tiles. A caller (a benchmark sweep) may pass a tile explicitly instead.

An entry is a list of tiles, each for calls of at most ``up_to`` work rows (for the decode
kernel: query rows per KV head, query heads of a group x queries; for the fused attention
kernel: queries per head; for the k-means assignment: the row's clusters, times the padded head
dim over 128 above 128 (wider centroids take more room on chip); the quantize, dequantize,
decompression and other k-means kernels have one tile for any call), the last for any; the best
tile for one query per head is not the best for sixteen, nor one that keeps 256 centroids on chip
for k-means||'s 512 candidates. A GPU the table does not name takes :data:`DEFAULT_ENTRIES` where
a kernel has them, else the kernel's default.
A decode tile may also hold only for calls that read at most ``reads_up_to`` span keys (the
spans' live keys times the batch): on an H100 one query over 33k keys at batch 1 wanted other
tiles than 132k keys or a batch of 8 (``benchmarks/results/tune_tiles_key_scores_block_n_h100.json``).
A decode tile may also name the class of keys it is for (``"keys"``, see
:func:`qkv.kernels.segments.key_class`): ``"centroids"`` for spans whose keys add centroids back
(qvg and the other smoothed presets), ``"codes"`` for other codes (rtn, kivi, quarot), ``"cast"``
for spans stored as floats (bf16 spans), which take the ``"codes"`` tiles where the GPU's entry
names no ``"cast"`` tile; a tile without it is for every class. At one query the classes want
different launches: on an H200 a register cap that speeds up plain codes makes the centroid
gathers spill, and on an H100 spans without decoding gain from deeper pipelining
(``benchmarks/results/tune_tiles_one_query_cast_quarot_h100.json``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import torch

from qkv.kernels.segments import KEY_CLASSES

TABLE = pathlib.Path(__file__).with_name("tiles.json")
# the fields of a table row that say which calls it is for (the rest is the tile)
TABLE_BOUNDS = ("up_to", "keys", "reads_up_to")


@dataclasses.dataclass(frozen=True)
class DecodeTile:
    """The decode kernel's launch: ``block_n`` keys per tile, ``piece`` keys per work item, at most
    ``max_rows`` query rows per program, ``warps`` per program, the software-pipelining depths to
    try in order (a layout whose shared memory does not fit takes the next), ``waves``:
    programs per multiprocessor to aim for (the keys are split until the GPU holds that many),
    and ``maxnreg``: the most registers a thread may take (None: the compiler's choice; fewer let
    more programs share a multiprocessor, at the price of spills); ``key_scores``: from this many
    keys read (the spans' live keys times the batch; None: never), keys that add centroids back
    are scored as q . r + q . c[pi], the table of q . c made once per call by a launch of its own,
    instead of adding a centroid row to every decoded key (see
    :func:`qkv.kernels.triton.decode.key_scores`)."""

    block_n: int = 64
    piece: int = 256
    max_rows: int = 64
    warps: int = 4
    stages: tuple[int, ...] = (2, 1)
    waves: int = 4
    maxnreg: int | None = None
    key_scores: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """The fused attention kernel's launches, tried in ``order`` until one fits the GPU's shared
    memory (a layout with deep smoothing, pipelined, needs more): each (BLOCK_M queries, BLOCK_N
    keys, warps, software-pipelining depth of the span loop and of the full-precision loop)."""

    order: tuple[tuple[int, int, int, int, int], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", tuple(tuple(t) for t in self.order))


@dataclasses.dataclass(frozen=True)
class DequantizeTile:
    """The dequantize kernel's launch: about ``fast_values`` output values per program on its
    per-token fast path (``fast_values // D`` tokens), ``values`` on the others, ``warps`` per
    program."""

    fast_values: int = 4096
    values: int = 8192
    warps: int = 4


@dataclasses.dataclass(frozen=True)
class QuantizeTile:
    """The quantize+pack kernel's launch: about ``values`` input values per program (whole rows
    of blocks: ``values // L`` rows of L values, at most 64), ``warps`` per program; and, for
    scale formats with a row multiplier, ``settle_tiles``: the tiles a program of the second
    pass settles (a power of two; it reads their raw scales in one load and writes their
    scales)."""

    values: int = 4096
    warps: int = 4
    settle_tiles: int = 8

    def __post_init__(self) -> None:
        if self.settle_tiles < 1 or self.settle_tiles & (self.settle_tiles - 1):
            raise ValueError(f"QuantizeTile: settle_tiles must be a power of two, got {self.settle_tiles}")


@dataclasses.dataclass(frozen=True)
class AssignTile:
    """The k-means assignment kernel's launch: ``tokens`` tokens per tile (half as many for head
    dims above 128), centroid tiles of up to ``clusters``, ``warps`` per program, ``stages``: the
    software-pipelining depth of the program's loop (3: Triton's default), and ``waves``: where
    every centroid of a row fits one tile (and in 64 KB), programs per multiprocessor to aim
    for, each keeping its row's centroids on chip and walking token tiles (0: a program per token
    tile, looping over the centroid tiles)."""

    tokens: int = 128
    clusters: int = 32
    warps: int = 4
    stages: int = 3
    waves: int = 0


@dataclasses.dataclass(frozen=True)
class DecompressTile:
    """The span decompression kernel's launch: ``piece`` keys per work item (a program),
    ``block_n`` keys per decoded tile, ``warps`` per program, and ``split``: a work item's K and
    V decoded by two programs instead of one."""

    piece: int = 128
    block_n: int = 16
    warps: int = 4
    split: bool = True


@dataclasses.dataclass(frozen=True)
class UpdateTile:
    """The one-hot k-means update's launch: ``tokens`` per step of a program, centroid blocks of
    up to ``clusters``, ``warps`` per program, and ``waves``: programs per multiprocessor to aim
    for (a row's tokens are split until the GPU holds that many)."""

    tokens: int = 64
    clusters: int = 64
    warps: int = 4
    waves: int = 4


@dataclasses.dataclass(frozen=True)
class AssignSumsTile:
    """The launch of the assignment that also gathers the clusters' sums in its own pass
    (``sums=True``, few clusters, every centroid in one block): ``tokens`` per step of a program,
    ``warps`` per program, ``waves`` as :class:`UpdateTile`'s; a table row's ``up_to`` counts
    clusters. Its own rows, not the update's: the update's best tile made this kernel up to 1.4x
    slower on an H100 (``benchmarks/results/bench_lloyd_step_swept_update_tile_h100.json``)."""

    tokens: int = 64
    warps: int = 4
    waves: int = 4


@dataclasses.dataclass(frozen=True)
class SeedTile:
    """The weighted D^2 sampling kernel's launch (k-means++ and k-means|| seeding): each round's
    distance pass over a row's points in loads of at most ``values`` (a few dims of every point),
    ``warps`` per program (one program a row; more for rows of over 256 points a warp, up to 16,
    so that the row's state stays in registers)."""

    values: int = 8192
    warps: int = 8


DEFAULTS = {
    "decode": DecodeTile(),
    "assign": AssignTile(),
    "update": UpdateTile(),
    "assign_sums": AssignSumsTile(),
    "kmeanspp": SeedTile(),
    # 128-key work items of 32 x 128 tiles, as the dequantize kernel's: a long span still spreads
    # over many programs (a 37,440-token span of 12 heads: 3,516)
    "decompress": DecompressTile(),
    # 4096-value tiles on the per-token fast path: the LongCat decode of benchmarks/bench_kernels.py
    # went from 0.139 ms (8192-value tiles) to 0.114 ms with them on an H100
    "dequantize": DequantizeTile(),
    "quantize": QuantizeTile(),
    # the fastest of benchmarks/bench_attention.py's sweep on an H100 first (its "tiles" rows)
    "attention": PrefillTiles(((256, 64, 8, 3, 3), (256, 64, 8, 2, 2), (128, 128, 8, 3, 3), (128, 64, 8, 2, 2))),
}
# The rows a GPU the table does not name takes for kernels whose best launch depends on the call
# on every GPU swept, as a table entry whose last row (for any call) is the kernel's default: the
# assignment keeps a row's centroids on chip up to 256 clusters (64 tokens a tile, 4 warps, 2
# programs a multiprocessor) and loops over tiles of 32 beyond, the H100 sweep's choices
# (benchmarks/results/tune_tiles_assign_resident_h100.json)
DEFAULT_ENTRIES = {
    "assign": [{"up_to": 256, **dataclasses.asdict(AssignTile(tokens=64, clusters=256, waves=2))},
               {"up_to": None, **dataclasses.asdict(DEFAULTS["assign"])}],
}
# small tiles, so that tests in the interpreter stay fast
INTERPRETER = {
    "decode": DecodeTile(block_n=16, piece=32, max_rows=16, warps=4, stages=(1,), waves=4),
    "assign": AssignTile(),
    "update": UpdateTile(),
    "assign_sums": AssignSumsTile(),
    "kmeanspp": SeedTile(),
    "decompress": DecompressTile(),
    "dequantize": DequantizeTile(),
    "quantize": QuantizeTile(),
    "attention": PrefillTiles(((16, 16, 4, 1, 1),)),
}


@functools.cache
def _table() -> dict:
    return json.loads(TABLE.read_text()) if TABLE.exists() else {}


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def multiprocessors(index: int) -> int:
    """The streaming multiprocessors of GPU ``index`` (kernels size their grids by them)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def tile_for(kernel: str, device: torch.device, rows: int, keys: str | None = None, reads: int = 0):
    """The tile of ``kernel`` (a key of :data:`DEFAULTS`) on ``device`` for ``rows`` work rows
    (and, for the decode kernel, the class of keys, one of :data:`KEY_CLASSES`, and the span keys
    the call reads over its batch, ``reads``): among the tiles of the table's entry for the GPU's
    name for that class of keys, those whose ``up_to`` holds the rows, then those for any row
    count (the last tile if none), the first whose ``reads_up_to`` holds the reads (the last of
    them if none does); the default where the table names no tile; the interpreter's tile off a
    GPU."""
    if keys is not None and keys not in KEY_CLASSES:
        raise ValueError(f"tile_for: keys must be one of {', '.join(KEY_CLASSES)}, got {keys!r}")
    if device.type != "cuda":
        return INTERPRETER[kernel]
    candidates = _gpu_tiles(kernel, _device_name(device.index or 0), rows, keys)
    return next((t for bound, t in candidates if bound is None or reads <= bound), candidates[-1][1])


@functools.cache
def _gpu_tiles(kernel: str, gpu: str, rows: int, keys: str | None) -> tuple[tuple[int | None, object], ...]:
    """The tiles :func:`tile_for` chooses from on the GPU named ``gpu`` for ``rows`` work rows of
    keys of class ``keys``, each with its ``reads_up_to``, in order (worked out once per call
    shape, not per call)."""
    default = DEFAULTS[kernel]
    entries = _table().get(gpu, {}).get(kernel) or DEFAULT_ENTRIES.get(kernel, [])
    if keys == "cast" and not any(e.get("keys") == "cast" for e in entries):
        keys = "codes"
    entry = [e for e in entries if e.get("keys") in (None, keys)]
    if not entry:
        return ((None, default),)
    chosen = ([e for e in entry if e.get("up_to") is not None and rows <= e["up_to"]]
              + [e for e in entry if e.get("up_to") is None]) or entry[-1:]
    return tuple((e.get("reads_up_to"), type(default)(**{k: v for k, v in e.items() if k not in TABLE_BOUNDS}))
                 for e in chosen)

