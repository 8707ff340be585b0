"""Policies: stateless descriptions of how to compress K and V, composed from components.

A :class:`TensorPolicy` chains, for one tensor: grouping -> smoothing (x stages) -> quantizer ->
packing, with an optional full-precision window of the newest tokens. A :class:`Policy` holds one
for keys and one for values. All policies run through the same kernels (:mod:`qkv.kernels`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from einops import rearrange

from qkv import kernels
from qkv.bounds import Bound, BoundKind, ErrorState, KVBound, holds, output_cast
from qkv.caches.compressed import CompressedKV, CompressedTensor, StageData
from qkv.caches.heads import batch_rows
from qkv.component import check_int
from qkv.dtypes import saturate
from qkv.errors import ConfigError, ShapeError
from qkv.grouping import Grouper, NoGrouping
from qkv.kernels import QuantizedRows
from qkv.kernels.kmeans import gather_centroids
from qkv.quantizers import AffineQuantizer, BitPacker, CastQuantizer, Smoother, Staging
from qkv.quantizers.packing import U8MSBPacker
from qkv.quantizers.smoothing import NoSmoothing
from qkv.quantizers.staging import SingleStage
from qkv.validation import check_kv_pair, check_kv_tensor


def _names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def _check_type(where: str, value: object, kind: type | tuple[type, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a ``kind``."""
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be {_names(kind)}, got {type(value).__name__}")


def flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """[B, H, ...] -> [B*H, ...] (None passes through). On every decompression's host path:
    torch's flatten costs a fraction of an einops pattern's parse and lookup."""
    return None if t is None else t.flatten(0, 1)


@dataclasses.dataclass(frozen=True)
class TensorPolicy:
    """How one tensor (K or V) is compressed.

    quantizer: an :class:`AffineQuantizer` (needs ``packing``) or a :class:`CastQuantizer`
    (no packing, no smoothing). ``window``: the newest tokens kept in full precision.
    """

    quantizer: AffineQuantizer | CastQuantizer
    grouping: Grouper = NoGrouping()
    smoothing: Smoother = NoSmoothing()
    staging: Staging = SingleStage()
    packing: BitPacker | None = U8MSBPacker()
    window: int = 0

    def __post_init__(self) -> None:
        for key, kind in (("quantizer", (AffineQuantizer, CastQuantizer)), ("grouping", Grouper),
                          ("smoothing", Smoother), ("staging", Staging), ("packing", (BitPacker, type(None)))):
            if not isinstance(getattr(self, key), kind):
                raise ConfigError(f"TensorPolicy: {key} must be {_names(kind)}, got {type(getattr(self, key)).__name__}")
        check_int("policy", "window", self.window, 0)
        cast = isinstance(self.quantizer, CastQuantizer)
        if cast and self.packing not in (None, U8MSBPacker()):  # U8MSBPacker(): the field's default
            raise ConfigError(f"{self.quantizer.token} stores floats: it takes no packing ({self.packing.token})")
        if cast and self.packing is not None:
            object.__setattr__(self, "packing", None)
        if not cast and self.packing is None:
            raise ConfigError(f"{self.quantizer.token} needs a packing format (u8msb or i32lsb)")
        if cast and (self.smoothing.name != "none" or self.staging.count != 1):
            raise ConfigError(f"{self.quantizer.token} stores floats: it takes no smoothing or staging")
        grouped = self.grouping.name != "none"
        if self.smoothing.needs_groups and not grouped:
            raise ConfigError(f"{self.smoothing.name} smoothing needs a grouping (kmeans, faiss, blocks)")
        if grouped and not self.smoothing.needs_groups:
            raise ConfigError(
                f"grouping {self.grouping.name} has no effect with {self.smoothing.name} smoothing; "
                "use centroid smoothing or drop the grouping"
            )
        if self.staging.count > 1 and not self.smoothing.needs_groups:
            raise ConfigError(f"{self.staging.token} repeats grouping + smoothing: it needs centroid smoothing")

    def __repr__(self) -> str:
        return f"TensorPolicy({self.spec!r})"  # the spec names it completely

    # -- spec ----------------------------------------------------------------------------------
    @functools.cached_property  # frozen: computed once (every decompression compares specs)
    def spec(self) -> str:
        """Spec string of this tensor policy (defaults omitted), e.g. ``kmeans,centroid,int2``."""
        parts = []
        if self.grouping.name != "none":
            parts.append(self.grouping.token)
        if self.smoothing.name != "none":
            parts.append(self.smoothing.token)
        if self.staging.name != "single":
            parts.append(self.staging.token)
        parts.append(self.quantizer.token)
        if self.packing is not None and self.packing != U8MSBPacker():
            parts.append(self.packing.token)
        if self.window:
            parts.append(f"window(tokens={self.window})")
        return ",".join(parts)

    # -- compression ---------------------------------------------------------------------------
    def quantized_length(self, tokens: int) -> int:
        """How many of ``tokens`` are quantized (the rest stay full precision)."""
        n = max(tokens - self.window, 0)
        if isinstance(self.quantizer, AffineQuantizer) and self.quantizer.axis == "channel":
            n -= n % self.quantizer.block
        return n

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise :class:`ShapeError` if this policy cannot compress a [B, H, S, D] tensor."""
        d = shape[-1]
        q = self.quantizer
        if isinstance(q, AffineQuantizer) and q.axis == "token" and d % q.block:
            raise ShapeError(f"{name}: {q.token} block size {q.block} does not divide head_dim D={d}")
        if self.smoothing.name == "hadamard" and d & (d - 1):
            raise ShapeError(f"{name}: hadamard smoothing needs head_dim D a power of two, got {d}")

    def compress(
        self,
        x: torch.Tensor,
        *,
        warm_start: CompressedTensor | None = None,
        backend: str = "auto",
        name: str = "x",
    ) -> CompressedTensor:
        """Compress ``x`` [B, H, S, D] (fp32/fp16/bf16).

        ``warm_start``: a previous :class:`CompressedTensor` of this policy whose centroids seed
        the clustering of every stage (k-means warm start across chunks). Runs without autograd:
        what is stored never holds a graph.
        """
        _check_type("compress: warm_start", warm_start, (CompressedTensor, type(None)))
        check_kv_tensor(name, x)
        self.check_shape(name, tuple(x.shape))
        return self._compress(x, self._warm(warm_start, x.shape[0] * x.shape[1]), backend)

    @torch.no_grad()
    def _compress(self, x: torch.Tensor, warm: list[torch.Tensor] | None, backend: str) -> CompressedTensor:
        """:meth:`compress` of an already validated ``x``; ``warm``: :meth:`_warm`'s centroids."""
        b, h, s, d = x.shape
        s_q = self.quantized_length(s)
        fp_tokens = x[:, :, s_q:].clone() if s_q < s else None
        codes = scales = zeros = mult = None
        stages: tuple[StageData, ...] = ()
        if s_q and isinstance(self.quantizer, CastQuantizer):
            # a copy even in the input's dtype: nothing compressed shares the caller's storage
            codes = x[:, :, :s_q].to(self.quantizer.storage_dtype, copy=True)
        elif s_q:
            flat = rearrange(x[:, :, :s_q], "b h s d -> (b h) s d")  # stages read it as it is
            # the last stage's centroid subtraction, if any, is fused into quantize+pack: the
            # residual it leaves is never written out (for one stage the kernel reads x itself)
            pending = None
            if self.staging.defers_last:
                residual, stored, pending = self.staging.run(
                    flat, self.grouping, self.smoothing, warm, backend=backend, defer_last=True
                )
            else:
                residual, stored = self.staging.run(flat, self.grouping, self.smoothing, warm, backend=backend)
            stages = tuple(
                StageData(
                    None if c is None else rearrange(c, "(b h) c d -> b h c d", b=b),
                    None if a is None else rearrange(a, "(b h) s -> b h s", b=b),
                )
                for c, a in stored
            )
            # quantize_pack computes in fp32 from any input dtype
            rows = residual if self.quantizer.axis == "token" else residual.transpose(1, 2)
            q = kernels.quantize_pack(
                rows, self.quantizer, self.packing,
                centroids=() if pending is None else (pending[0],),
                assignments=() if pending is None else (pending[1],),
                backend=backend,
            )
            codes = rearrange(q.codes, "(b h) r p -> b h r p", b=b)
            scales = rearrange(q.scales, "(b h) r g -> b h r g", b=b)
            zeros = None if q.zeros is None else rearrange(q.zeros, "(b h) r g -> b h r g", b=b)
            mult = None if q.mult is None else rearrange(q.mult, "(b h) -> b h", b=b)
        return CompressedTensor((b, h, s, d), x.dtype, s_q, codes, scales, zeros, mult, stages, fp_tokens)

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

    def decompress(self, ct: CompressedTensor, *, backend: str = "auto") -> torch.Tensor:
        """Reconstruct [B, H, S, D] in the dtype the tensor was compressed from."""
        _check_type("decompress: the data", ct, CompressedTensor)
        b, h, s, d = ct.shape
        parts = []
        if ct.quantized_tokens and isinstance(self.quantizer, CastQuantizer):
            parts.append(saturate(ct.codes, ct.dtype))
        elif ct.quantized_tokens:
            parts.append(saturate(rearrange(self._dequantize(ct, backend), "(b h) s d -> b h s d", b=b), ct.dtype))
        if ct.fp_tokens is not None:
            parts.append(ct.fp_tokens)
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _dequantize(self, ct: CompressedTensor, backend: str) -> torch.Tensor:
        """[B*H, S_q, D]: dequantized residual with every stage undone."""
        b, h, _, _ = ct.shape
        rows = QuantizedRows(flat(ct.codes), flat(ct.scales), flat(ct.zeros), flat(ct.scale_mult))
        centroids, assignments = [], []
        if self.smoothing.additive:
            for stage in ct.stages:
                centroids.append(flat(stage.centroids))
                assignments.append(self.stage_assignments(stage, b * h, ct.quantized_tokens, ct.codes.device))
        # additive smoothing is undone inside the kernel: write the output dtype directly
        out_dtype = ct.dtype if self.smoothing.additive or self.smoothing.name == "none" else torch.float32
        out = kernels.dequantize(
            rows, self.quantizer, self.packing, ct.quantized_tokens, centroids, assignments,
            out_dtype=out_dtype, backend=backend,
        )
        if not self.smoothing.additive:
            for _ in ct.stages:
                out = self.smoothing.inverse(out, backend=backend)
        return out

    def stage_assignments(self, stage: StageData, rows: int, tokens: int, device: torch.device) -> torch.Tensor:
        """[B*H, S_q] group of every token in one stage: stored, implied by the grouper, or - for an
        additive smoother that needs no grouping and stores one row [B, H, 1, D] - row 0 for all."""
        assign = flat(stage.assignments)
        if assign is not None:
            return assign
        if isinstance(self.grouping, NoGrouping):
            if stage.centroids.shape[2] != 1:
                raise ConfigError(
                    f"{self.smoothing.name} stored {stage.centroids.shape[2]} rows of offsets without "
                    "assignments or a grouping; store one row, or assignments"
                )
            return torch.zeros(rows, tokens, dtype=torch.long, device=device)
        return self.grouping.implicit_assignments(rows, tokens, device)

    # -- error bound ---------------------------------------------------------------------------
    def error_bound(self, ct: CompressedTensor, x_hat: torch.Tensor | None = None) -> Bound:
        """A guaranteed bound on ``|decompress(ct) - x|`` computed from ``ct`` alone (see
        :mod:`qkv.bounds`): element [B, H, S, D] or, after a rotation, token_l2 [B, H, S]; ``none``
        if a component declares no error propagation.

        The quantizer bounds its stored residual, the staging undoes every smoothing stage through
        the smoother's ``propagate``, and the rounding to the output dtype is added last, from
        ``x_hat`` (this tensor's decompressed output, tighter) when given. Window tokens: 0.
        """
        b, h, s, d = ct.shape
        s_q = ct.quantized_tokens
        if x_hat is not None and tuple(x_hat.shape) != tuple(ct.shape):
            raise ShapeError(f"x_hat has shape {tuple(x_hat.shape)}, the compressed tensor {tuple(ct.shape)}")
        parts = []
        if s_q:
            if isinstance(self.quantizer, CastQuantizer):
                state = self.quantizer.error_bound(flat(ct.codes), ct.dtype)
                source = self.quantizer.storage_dtype
                if holds(source, ct.dtype):  # stored exactly as input: they cast back exactly
                    source = ct.dtype
            else:
                state = self._residual_bound(ct)
                source = torch.float32
            decoded = None if x_hat is None else flat(x_hat[:, :, :s_q])
            bound = output_cast(state, source, decoded, ct.dtype)
            split = "(b h) s d -> b h s d" if bound.kind is BoundKind.ELEMENT else "(b h) s -> b h s"
            parts.append(bound.map(lambda v: rearrange(v, split, b=b)))
        if s_q < s:
            device = ct.fp_tokens.device
            parts.append(Bound.element(torch.zeros(b, h, s - s_q, d, dtype=torch.float64, device=device)))
        return Bound.cat(parts).widened()

    def _residual_bound(self, ct: CompressedTensor) -> ErrorState:
        """fp32 bound [B*H, S_q, D] of the quantized tokens with every stage undone."""
        b = ct.shape[0]
        q = self.quantizer
        state = q.error_bound(flat(ct.scales), flat(ct.zeros), flat(ct.scale_mult))
        if q.axis == "token" and state.magnitude.shape[1] != ct.quantized_tokens:
            raise ShapeError(f"scales cover {state.magnitude.shape[1]} tokens, expected {ct.quantized_tokens}")
        added: list[torch.Tensor | None] = []
        for stage in ct.stages:
            if self.smoothing.additive and stage.centroids is not None:
                assign = self.stage_assignments(stage, b * ct.shape[1], ct.quantized_tokens, ct.codes.device)
                added.append(gather_centroids(flat(stage.centroids), assign))
            else:
                added.append(None)
        return self.staging.propagate(state, self.smoothing, added)


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

    @torch.no_grad()
    def compress(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        warm_start: CompressedKV | None = None,
        backend: str = "auto",
        validate: bool = True,
    ) -> CompressedKV:
        """Compress keys and values [B, H, S, D] (same shape, device; fp32/fp16/bf16).

        ``warm_start``: the previous span's :class:`CompressedKV` (seeds the clustering).
        ``validate``: check that the values are finite and in range (one read-back for both);
        False for data already checked (:class:`~qkv.KVCache` checks each chunk as it comes).

        When keys and values share one tensor policy (and dtype), they are compressed in one pass,
        stacked along the batch: every (batch, head) row is clustered and quantized on its own, so
        the result is the same as two passes (except a random k-means init, drawn for all rows at
        once), with half the kernel launches. Runs without autograd: what is stored never holds a
        graph.
        """
        _check_type("compress: warm_start", warm_start, (CompressedKV, type(None)))
        check_kv_pair(k, v, values=validate)
        self.k.check_shape("k", tuple(k.shape))
        self.v.check_shape("v", tuple(v.shape))
        rows = k.shape[0] * k.shape[1]
        warm_k = self.k._warm(None if warm_start is None else warm_start.k, rows)
        warm_v = self.v._warm(None if warm_start is None else warm_start.v, rows)
        if self.k == self.v and k.dtype == v.dtype:
            warm = None if warm_k is None else [torch.cat(pair) for pair in zip(warm_k, warm_v)]
            both = self.k._compress(torch.cat([k, v]), warm, backend)
            b = k.shape[0]
            return CompressedKV(batch_rows(both, 0, b), batch_rows(both, b, 2 * b), self.spec)
        return CompressedKV(self.k._compress(k, warm_k, backend), self.v._compress(v, warm_v, backend), self.spec)

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

