"""Policies: stateless descriptions of how to compress K and V, composed from components.

A :class:`TensorPolicy` chains, for one tensor: grouping -> smoothing (x stages) -> quantizer ->
packing, with an optional full-precision window of the newest tokens. A :class:`Policy` holds one
for keys and one for values. All policies run through the same kernels (:mod:`qkv.kernels`).
What a policy stores is described by its :meth:`TensorPolicy.format`, which the data carries:
decoding, bounds and loading read the data alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from einops import rearrange

from qkv import kernels
from qkv.bounds import Bound, KVBound, tensor_bound
from qkv.caches.encode_graphs import EncodeGraphs
from qkv.caches.heads import batch_rows
from qkv.caches.tail import stacked
from qkv.component import check_int
from qkv.compressed import CompressedKV, CompressedTensor, StageData
from qkv.errors import ConfigError, ShapeError
from qkv.format import TensorFormat, Undo, quantized_length
from qkv.grouping import Grouper, NoGrouping
from qkv.quantizers import BitPacker, Quantizer, Smoother, Staging
from qkv.quantizers.packing import U8MSBPacker
from qkv.quantizers.smoothing import NoSmoothing
from qkv.quantizers.staging import SingleStage
from qkv.validation import ValueCheck, check_kv_layout, check_kv_pair, values_checked


def _batch(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along the batch (the one part itself, uncopied, if there is one)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclasses.dataclass(frozen=True)
class _Report:
    """Hands the row peaks an encode measured of the tensors at ``indices`` of ``check``, stacked
    along the batch (``sizes``: B x H rows each), to the check; ``a + b``: of a's tensors, then
    b's, stacked in one encode (one read-back for all)."""

    check: ValueCheck
    indices: tuple[int, ...]
    sizes: tuple[int, ...]

    def __call__(self, measured: torch.Tensor) -> None:
        self.check.report(self.indices, measured.split(self.sizes))

    def __add__(self, other: _Report) -> _Report:
        return _Report(self.check, self.indices + other.indices, self.sizes + other.sizes)


def _peaks_of(check: ValueCheck, indices: list[int], xs: list[torch.Tensor]) -> tuple:
    """The value check's row peaks of the tensors ``xs`` (at ``indices`` in ``check``) stacked
    along the batch: (their rows [sum of B x H], None) where the check reduced them, else (None,
    the :class:`_Report` of the rows the encode measures)."""
    rows = [check.rows(i) for i in indices]
    if rows[0] is not None:
        return torch.cat([r.flatten() for r in rows]), None
    return None, _Report(check, tuple(indices), tuple(x.shape[0] * x.shape[1] for x in xs))


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def _check_type(where: str, value: object, kind: type | tuple[type, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a ``kind``."""
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be {_names(kind)}, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class TensorPolicy:
    """How one tensor (K or V) is compressed.

    quantizer: integer codes (``packed``: needs ``packing``) or a float cast (no packing, no
    smoothing). ``window``: the newest tokens kept in full precision.
    """

    quantizer: Quantizer
    grouping: Grouper = NoGrouping()
    smoothing: Smoother = NoSmoothing()
    staging: Staging = SingleStage()
    packing: BitPacker | None = U8MSBPacker()
    window: int = 0

    def __post_init__(self) -> None:
        for key, kind in (("quantizer", Quantizer), ("grouping", Grouper),
                          ("smoothing", Smoother), ("staging", Staging), ("packing", (BitPacker, type(None)))):
            if not isinstance(getattr(self, key), kind):
                raise ConfigError(f"TensorPolicy: {key} must be {_names(kind)}, got {type(getattr(self, key)).__name__}")
        check_int("policy", "window", self.window, 0)
        packed = self.quantizer.packed
        if not packed and self.packing not in (None, U8MSBPacker()):  # U8MSBPacker(): the field's default
            raise ConfigError(f"{self.quantizer.token} stores floats: it takes no packing ({self.packing.token})")
        if not packed and self.packing is not None:
            object.__setattr__(self, "packing", None)
        if packed and self.packing is None:
            raise ConfigError(f"{self.quantizer.token} needs a packing format (u8msb or i32lsb)")
        if not packed and (self.smoothing != NoSmoothing() or self.staging.count != 1):
            raise ConfigError(f"{self.quantizer.token} stores floats: it takes no smoothing or staging")
        grouped = self.grouping.grouped
        if self.smoothing.needs_groups and not grouped:
            raise ConfigError(f"{self.smoothing.name} smoothing needs a grouping (kmeans, faiss, blocks)")
        if grouped and not self.smoothing.needs_groups:
            raise ConfigError(
                f"grouping {self.grouping.name} has no effect with {self.smoothing.name} smoothing; "
                "use centroid smoothing or drop the grouping"
            )
        if self.staging.count > 1 and not self.smoothing.needs_groups:
            raise ConfigError(f"{self.staging.token} repeats grouping + smoothing: it needs centroid smoothing")
        self.smoothing.stage_format(self.grouping)  # the smoother declares how it is undone

    def __repr__(self) -> str:
        return f"TensorPolicy({self.spec!r})"  # the spec names it completely

    # -- spec ----------------------------------------------------------------------------------
    @functools.cached_property  # frozen: computed once (every decompression compares specs)
    def spec(self) -> str:
        """Spec string of this tensor policy (defaults omitted), e.g. ``kmeans,centroid,int2``."""
        parts = []
        if self.grouping != NoGrouping():
            parts.append(self.grouping.token)
        if self.smoothing != NoSmoothing():
            parts.append(self.smoothing.token)
        if self.staging != SingleStage():
            parts.append(self.staging.token)
        parts.append(self.quantizer.token)
        if self.packing is not None and self.packing != U8MSBPacker():
            parts.append(self.packing.token)
        if self.window:
            parts.append(f"window(tokens={self.window})")
        return ",".join(parts)

    # -- what it stores ------------------------------------------------------------------------
    @functools.lru_cache(maxsize=16)  # noqa: B019 (frozen, hashable: one format per head dim)
    def format(self, head_dim: int) -> TensorFormat:
        """How a [B, H, S, ``head_dim``] tensor compressed by this policy is stored; raises
        :class:`ConfigError` if it cannot be (a block that does not divide D, a rotation of a D
        that is not a power of two)."""
        pack = None if self.packing is None else self.packing.format
        stages = (self.smoothing.stage_format(self.grouping),) * self.staging.count if self.quantizer.packed else ()
        return self.quantizer.tensor_format(head_dim, pack=pack, window=self.window, stages=stages)

    @property
    def token_group(self) -> int | None:
        """The fewest consecutive tokens this policy compresses on their own, as it would inside any
        longer span: its per-channel block (KIVI's keys), 1 for per-token codes, rotations and
        casts; None when it reads a whole span at once (add-back smoothing: the span's tokens share
        its centroids)."""
        if self.smoothing.stage_format(self.grouping).undo is Undo.ADD:
            return None
        codes = self.quantizer.code_format()
        return codes.block if codes is not None and codes.axis == "channel" else 1

    def quantized_length(self, tokens: int) -> int:
        """How many of ``tokens`` are quantized (the rest stay full precision)."""
        return quantized_length(tokens, self.window, self.quantizer.code_format())

    def predicted_groups(self, tokens: int) -> int:
        """Rows per stage a fresh (not warm-started) compression of ``tokens`` quantized tokens stores."""
        if not tokens or not self.quantizer.packed or self.smoothing.stage_format(self.grouping).undo is not Undo.ADD:
            return 0
        return self.grouping.predicted_groups(tokens)

    def predicted_nbytes(self, shape: tuple[int, int, int, int], dtype: torch.dtype) -> int:
        """Exact bytes :meth:`compress` stores for a tensor of ``shape`` (without warm start)."""
        fmt = self.format(shape[3])
        groups = [self.predicted_groups(fmt.quantized_length(shape[2]))] * len(fmt.stages)
        layout = fmt.layout(shape, dtype, groups)
        return sum(math.prod(size) * dt.itemsize for size, dt in layout.values())

    def fits_warm_start(self, previous: CompressedTensor, shape: tuple[int, ...]) -> bool:
        """Whether ``previous`` can warm-start the clustering of a tensor of ``shape``
        [B, H, S, D]: the same batch and heads, and in every stage the groups a fresh clustering
        of S tokens would make (fewer tokens than clusters make fewer groups)."""
        want = self.predicted_groups(self.quantized_length(shape[2]))
        return tuple(previous.shape[:2]) == tuple(shape[:2]) and all(
            s.centroids is None or s.centroids.shape[2] == want for s in previous.stages)

    def measures_peaks(self, shape: tuple[int, ...], warm: bool) -> bool:
        """Whether :meth:`_compress` of a [B, H, S, D] tensor of ``shape`` (warm-started or not),
        given no row peaks, measures them in a pass that reads every value anyway (k-means's first
        assignment: :meth:`~qkv.grouping.base.Grouper.measures_peaks`) and hands them to its
        ``found``, so that a value check need not read the tensor for them."""
        fmt = self.format(shape[3])
        return (fmt.cast is None and fmt.quantized_length(shape[2]) == shape[2] and self.smoothing.needs_groups
                and self.staging.takes_peaks and self.grouping.takes_peaks and self.grouping.measures_peaks(warm))

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise :class:`ShapeError` if this policy cannot compress a [B, H, S, D] tensor."""
        try:
            self.format(shape[-1])
        except ConfigError as exc:
            raise ShapeError(f"{name}: {str(exc).removeprefix('format: ')}") from None

    # -- compression ---------------------------------------------------------------------------
    def compress(
        self,
        x: torch.Tensor,
        *,
        warm_start: CompressedTensor | None = None,
        backend: str = "auto",
        name: str = "x",
        validate: bool = True,
    ) -> CompressedTensor:
        """Compress ``x`` [B, H, S, D] (fp32/fp16/bf16).

        ``warm_start``: a previous :class:`CompressedTensor` of this policy whose centroids seed
        the clustering of every stage (k-means warm start across chunks). ``validate``: check
        that the values are finite and in range (one read-back to the host; on a GPU read once
        the encode is queued: :func:`qkv.validation.values_checked`). Runs without autograd: what
        is stored never holds a graph.
        """
        _check_type("compress: warm_start", warm_start, (CompressedTensor, type(None)))
        check_kv_layout(name, x)
        self.check_shape(name, tuple(x.shape))
        warm = self._warm(warm_start, x.shape[0] * x.shape[1])
        measured = [self.measures_peaks(tuple(x.shape), warm is not None)]
        with values_checked([(name, x)] if validate else [], measured) as check:
            if check is None:
                return self._compress(x, warm, backend)
            peaks = check.rows(0)
            found = None if peaks is not None else _Report(check, (0,), (x.shape[0] * x.shape[1],))
            return self._compress(x, warm, backend, peaks, found)

    @torch.no_grad()
    def _compress(self, x: torch.Tensor, warm: list[torch.Tensor] | None, backend: str,
                  peaks: torch.Tensor | None = None, found=None) -> CompressedTensor:
        """:meth:`compress` of an already validated ``x``; ``warm``: :meth:`_warm`'s centroids;
        ``peaks``: the max |x| of each (batch, head) row ([B, H] fp32) if the value check read
        them (the first grouping then need not read ``x`` for them); ``found``: called with them
        ([B x H] fp32) where the encode measures them instead (:meth:`measures_peaks`)."""
        b, h, s, d = x.shape
        fmt = self.format(d)
        s_q = fmt.quantized_length(s)
        fp_tokens = x[:, :, s_q:].clone() if s_q < s else None
        codes = scales = zeros = mult = None
        stages: tuple[StageData, ...] = ()
        if s_q and fmt.cast is not None:
            # a copy even in the input's dtype: nothing compressed shares the caller's storage
            codes = x[:, :, :s_q].to(fmt.cast_dtype, copy=True)
        elif s_q:
            flat = rearrange(x[:, :, :s_q], "b h s d -> (b h) s d")  # stages read it as it is
            # the last stage's centroid subtraction, if any, is fused into quantize+pack: the
            # residual it leaves is never written out (for one stage the kernel reads x itself)
            pending = None
            known = {"peaks": None if peaks is None else peaks.flatten(), "found": found} if self.staging.takes_peaks else {}  # rows (b h)
            if self.staging.defers_last:
                residual, stored, pending = self.staging.run(
                    flat, self.grouping, self.smoothing, warm, backend=backend, defer_last=True, **known
                )
            else:
                residual, stored = self.staging.run(flat, self.grouping, self.smoothing, warm, backend=backend, **known)
            stages = tuple(
                StageData(
                    None if c is None else rearrange(c, "(b h) c d -> b h c d", b=b),
                    None if a is None else rearrange(a, "(b h) s -> b h s", b=b),
                )
                for c, a in stored
            )
            # quantize_pack computes in fp32 from any input dtype
            rows = residual if fmt.codes.axis == "token" else residual.transpose(1, 2)
            q = kernels.quantize_pack(
                rows, fmt.codes,
                centroids=() if pending is None else (pending[0],),
                assignments=() if pending is None else (pending[1],),
                backend=backend,
            )
            codes = rearrange(q.codes, "(b h) r p -> b h r p", b=b)
            scales = rearrange(q.scales, "(b h) r g -> b h r g", b=b)
            zeros = None if q.zeros is None else rearrange(q.zeros, "(b h) r g -> b h r g", b=b)
            mult = None if q.mult is None else rearrange(q.mult, "(b h) -> b h", b=b)
        return CompressedTensor(fmt, (b, h, s, d), x.dtype, s_q, codes, scales, zeros, mult, stages, fp_tokens)

    def _warm(self, previous: CompressedTensor | None, rows: int) -> list[torch.Tensor] | None:
        if previous is None or not self.smoothing.needs_groups or not previous.stages:
            return None
        if len(previous.stages) != self.staging.count:
            raise ConfigError(
                f"warm start has {len(previous.stages)} stages, this policy has {self.staging.count}"
            )
        out = [rearrange(st.centroids.float(), "b h c d -> (b h) c d") for st in previous.stages]
        if out[0].shape[0] != rows:
            raise ShapeError(f"warm start covers {out[0].shape[0]} (batch, head) rows, input has {rows}")
        return out

    def _check_data(self, ct: CompressedTensor) -> None:
        _check_type("the data", ct, CompressedTensor)
        if ct.format != self.format(ct.shape[3]):
            raise ConfigError(f"data stored as {ct.format} was not compressed by this policy {self.spec!r}")

    def decompress(self, ct: CompressedTensor, *, backend: str = "auto") -> torch.Tensor:
        """Reconstruct [B, H, S, D] in the dtype the tensor was compressed from
        (:func:`qkv.kernels.decompress`: the data describes itself)."""
        self._check_data(ct)
        return kernels.decompress(ct, backend=backend)

    # -- error bound ---------------------------------------------------------------------------
    def error_bound(self, ct: CompressedTensor, x_hat: torch.Tensor | None = None) -> Bound:
        """A guaranteed bound on ``|decompress(ct) - x|`` computed from ``ct`` alone
        (:func:`qkv.bounds.tensor_bound`): element [B, H, S, D] or, after a rotation, token_l2
        [B, H, S]. ``x_hat``: this tensor's decompressed output (tighter output rounding)."""
        self._check_data(ct)
        return tensor_bound(ct, x_hat)


@dataclasses.dataclass(frozen=True)
class Policy:
    """A K policy and a V policy. ``name`` is the preset it came from (display only)."""

    k: TensorPolicy
    v: TensorPolicy
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_type("Policy: k", self.k, TensorPolicy)
        _check_type("Policy: v", self.v, TensorPolicy)

    def __repr__(self) -> str:
        return f"Policy({self.spec!r})" if self.name is None else f"Policy({self.spec!r}, name={self.name!r})"

    @functools.cached_property  # frozen: computed once (every decompression compares specs)
    def spec(self) -> str:
        """Spec string; ``qkv.build_policy(policy.spec)`` rebuilds an equal policy."""
        if self.k == self.v:
            return self.k.spec
        return f"k:{self.k.spec};v:{self.v.spec}"

    def __str__(self) -> str:
        return self.spec if self.name is None else f"{self.name} ({self.spec})"

    @property
    def token_group(self) -> int | None:
        """The fewest consecutive tokens keys and values are both compressed in on their own (the
        least common multiple of :attr:`TensorPolicy.token_group`), or None if either reads a whole
        span at once."""
        k, v = self.k.token_group, self.v.token_group
        return None if k is None or v is None else math.lcm(k, v)

    @torch.no_grad()
    def compress(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        warm_start: CompressedKV | None = None,
        backend: str = "auto",
        validate: bool = True,
        graphs: EncodeGraphs | None = None,
    ) -> CompressedKV:
        """Compress keys and values [B, H, S, D] (same shape, device; fp32/fp16/bf16).

        ``warm_start``: the previous span's :class:`CompressedKV` (seeds the clustering).
        ``validate``: check that the values are finite and in range (one read-back for both; on a
        GPU read once the encode is queued, so the host does not wait before launching it); False
        for data already checked (:class:`~qkv.KVCache` checks each chunk as it comes).
        ``graphs``: replay the encodes that draw nothing from CUDA graphs (:mod:`qkv.caches.encode_graphs`).

        When keys and values share one tensor policy (and dtype), they are compressed in one pass,
        stacked along the batch: every (batch, head) row is clustered and quantized on its own, so
        the result is the same as two passes (except a random k-means init, drawn for all rows at
        once), with half the kernel launches. Runs without autograd: what is stored never holds a
        graph.
        """
        return self.compress_many([(k, v)], warm_starts=[warm_start], backend=backend, validate=validate,
                                  graphs=graphs)[0]

    @torch.no_grad()
    def compress_many(
        self,
        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        warm_starts: Sequence[CompressedKV | None] | None = None,
        backend: str = "auto",
        validate: bool = True,
        graphs: EncodeGraphs | None = None,
        names: Sequence[str] | None = None,
    ) -> list[CompressedKV]:
        """:meth:`compress` of every (k, v) of ``pairs`` (``warm_starts[i]`` for pair i), in as few
        passes as the inputs allow: pairs of one [H, S, D], dtype and device, all with a warm start
        or all without, are stacked along the batch and compressed in one pass, then split. Each
        (batch, head) row is compressed on its own (k-means's random draws are shared by all rows),
        so every result equals what :meth:`compress` gives for its pair, bit for bit; the spans of
        all the layers of a model (one chunk each) then cost one pass instead of one per layer.
        ``names[i]``: what a value error calls pair i (default ``pairs[i]``)."""
        warm_starts = [None] * len(pairs) if warm_starts is None else list(warm_starts)
        if len(warm_starts) != len(pairs):
            raise ConfigError(f"compress_many: {len(warm_starts)} warm starts for {len(pairs)} pairs")
        if names is not None and len(names) != len(pairs):
            raise ConfigError(f"compress_many: {len(names)} names for {len(pairs)} pairs")
        passes: dict[tuple, list[int]] = {}
        named, measured = [], []  # the values to check (every pair's) and those the encode measures
        for i, ((k, v), warm) in enumerate(zip(pairs, warm_starts)):
            _check_type("compress: warm_start", warm, (CompressedKV, type(None)))
            check_kv_pair(k, v)
            self.k.check_shape("k", tuple(k.shape))
            self.v.check_shape("v", tuple(v.shape))
            passes.setdefault((tuple(k.shape[1:]), k.dtype, v.dtype, k.device, warm is None), []).append(i)
            where = f"{names[i]}: " if names is not None else "" if len(pairs) == 1 else f"pairs[{i}]: "
            named += [(f"{where}k", k), (f"{where}v", v)] if validate else []
            # a graph's replay runs no Python, so it could not report what it measured
            measured += [graphs is None and tp.measures_peaks(tuple(x.shape), warm is not None)
                         for tp, x in ((self.k, k), (self.v, v))]
        out: list[CompressedKV | None] = [None] * len(pairs)
        with values_checked(named, measured) as check:  # k and v of each pair in turn
            for members in passes.values():
                ks, vs = [pairs[i][0] for i in members], [pairs[i][1] for i in members]
                warms = [warm_starts[i] for i in members]
                warm_k, warm_v = self._warm_rows(self.k, "k", ks, warms), self._warm_rows(self.v, "v", vs, warms)
                peaks = None if check is None else (_peaks_of(check, [2 * i for i in members], ks),
                                                    _peaks_of(check, [2 * i + 1 for i in members], vs))
                stacked_pairs = self._compress_stacked(ks, vs, warm_k, warm_v, backend, peaks, graphs)
                for i, (ct_k, ct_v) in zip(members, stacked_pairs):
                    out[i] = CompressedKV(ct_k, ct_v, self.spec)
        return out

    @staticmethod
    def _warm_rows(tp: TensorPolicy, which: str, xs: list[torch.Tensor], warm: list[CompressedKV | None]):
        """The warm-start centroids of ``xs`` stacked along their rows (None without warm starts)."""
        if warm[0] is None:
            return None
        per = [tp._warm(getattr(w, which), x.shape[0] * x.shape[1]) for w, x in zip(warm, xs)]
        return None if per[0] is None else [torch.cat(stage) for stage in zip(*per)]

    def _compress_stacked(self, ks, vs, warm_k, warm_v, backend, peaks=None,
                          graphs: EncodeGraphs | None = None) -> list[tuple[CompressedTensor, CompressedTensor]]:
        """Compress ``ks`` and ``vs`` (one [H, S, D] and dtype each) stacked along the batch, in one
        pass when K and V share a policy and dtype: (k, v) compressed per input. ``peaks``: the
        value check's row peaks of ``ks`` and of ``vs``, each :func:`_peaks_of`'s (rows, found), or
        None; ``graphs``: where the encodes that draw nothing replay (see :meth:`compress`)."""

        one_pass = self.k == self.v and ks[0].dtype == vs[0].dtype
        split = one_pass or len(ks) > 1  # batch_rows copies the parts

        def encode(tp: TensorPolicy, x, warm, rows, found):
            if graphs is None:
                return tp._compress(x, warm, backend, rows, found)
            return graphs.encode(tp, x, warm, backend, rows, copy=not split)

        bounds = [0]
        for k in ks:
            bounds.append(bounds[-1] + k.shape[0])
        (k_rows, k_found), (v_rows, v_found) = peaks or ((None, None), (None, None))
        if one_pass:  # keys then values, one copy
            warm = None if warm_k is None else [torch.cat(pair) for pair in zip(warm_k, warm_v)]
            rows = None if k_rows is None else torch.cat([k_rows, v_rows])
            found = None if k_found is None else k_found + v_found  # the keys' rows, then the values'
            ct_k = ct_v = encode(self.k, stacked([*ks, *vs]), warm, rows, found)
            shift = bounds[-1]
        else:
            ct_k, shift = encode(self.k, _batch(ks), warm_k, k_rows, k_found), 0
            ct_v = encode(self.v, _batch(vs), warm_v, v_rows, v_found)
            if len(ks) == 1:
                return [(ct_k, ct_v)]
        return [(batch_rows(ct_k, a, b), batch_rows(ct_v, shift + a, shift + b)) for a, b in zip(bounds, bounds[1:])]

    def decompress(self, ckv: CompressedKV, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """(k_hat, v_hat) with the shapes and dtypes of the compressed inputs."""
        _check_type("decompress: the data", ckv, CompressedKV)
        if ckv.spec != self.spec:
            raise ConfigError(f"data was compressed by {ckv.spec!r}, not by this policy {self.spec!r}")
        return self.k.decompress(ckv.k, backend=backend), self.v.decompress(ckv.v, backend=backend)

    def error_bound(
        self, ckv: CompressedKV, k_hat: torch.Tensor | None = None, v_hat: torch.Tensor | None = None
    ) -> KVBound:
        """Guaranteed bounds on the reconstruction error of keys and values, from ``ckv`` alone
        (see :meth:`TensorPolicy.error_bound`); ``k_hat`` / ``v_hat``: the decompressed outputs, if
        at hand (tighter output-dtype rounding)."""
        if ckv.spec != self.spec:
            raise ConfigError(f"data was compressed by {ckv.spec!r}, not by this policy {self.spec!r}")
        return KVBound(self.k.error_bound(ckv.k, k_hat), self.v.error_bound(ckv.v, v_hat))

