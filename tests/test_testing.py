"""qkv.testing: its strategies, its assertion helper, and the property tests it gives the project.

Every registered component and every preset is property-tested here against the bound its
compressed data reports; a component registered in qkv (or by a conftest/plugin before collection)
gets its own test case without a new test being written.
"""

import dataclasses
import subprocess
import sys
import textwrap
from typing import ClassVar

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

import qkv
import qkv.bounds
from qkv.bounds import ErrorState
from qkv.format import Undo
from qkv.errors import BoundViolation
from qkv.caches import TensorPolicy
from qkv.quantizers import AffineQuantizer
from qkv.registry import Registry
from qkv.spec import KINDS
from qkv.testing import (
    DTYPES,
    assert_within_bound,
    available,
    components,
    kv_pairs,
    kv_shapes,
    kv_tensors,
    policies,
    tensor_policies,
)

# Small shapes: the CI profile's 40 examples per test keep these under a minute on two cores.
SMALL = {"max_tokens": 96, "head_dims": (16, 32, 64), "max_batch": 2, "max_heads": 2}
# existence checks: generate until found, no shrinking
SEARCH = settings(max_examples=3000, database=None, derandomize=True, phases=[Phase.generate])


def uses(policy, kind: str, name: str) -> bool:
    tensors = (policy.k, policy.v) if isinstance(policy, qkv.Policy) else (policy,)
    for tensor in tensors:
        component = getattr(tensor, kind)
        if component is None:
            continue
        token = component.token.split("(")[0]
        if name in (component.name, token):
            return True
    return False


# -- the strategies -------------------------------------------------------------------------------
@given(data=st.data())
def test_kv_tensors_are_valid_cache_tensors(data):
    shape = data.draw(kv_shapes())
    dtype = data.draw(st.sampled_from(DTYPES))
    x = data.draw(kv_tensors(shape, dtype))
    assert tuple(x.shape) == shape and x.dtype == dtype and 1 <= shape[2] <= 4096
    assert bool(torch.isfinite(x).all())
    assert float(x.abs().max()) <= min(torch.finfo(dtype).max, 2.0**120)


@pytest.mark.parametrize(
    "what, predicate",
    [
        ("a long span", lambda x: x.shape[2] > 2000),
        ("an fp16 tensor at its largest value", lambda x: x.abs().max() == 65504),
        ("fp32 beyond 2**100", lambda x: x.abs().max() > 2.0**100),
        ("subnormal values", lambda x: bool(((x != 0) & (x.abs() < torch.finfo(x.dtype).smallest_normal)).any())),
        ("an all-zero tensor", lambda x: not bool(x.any())),
        ("all-zero tokens among others", lambda x: x.any() and bool((x == 0).all(-1).any())),
        ("a channel outlier", lambda x: bool(
            (x.float().abs().amax((0, 1, 2)) > 50 * x.float().abs().amax((0, 1, 2)).median()).any())),
        ("clustered tokens (exact repeats)", lambda x: x.shape[2] >= 8 and x.any()
         and torch.unique(x[0, 0], dim=0).shape[0] <= x.shape[2] // 4),
    ],
)
def test_kv_tensors_cover_what_real_caches_have(what, predicate):
    dtype = torch.float16 if "fp16" in what else torch.float32 if "fp32" in what else None
    small = {} if "long" in what else {"max_tokens": 64, "head_dims": (16, 32)}
    find(kv_tensors(dtype=dtype, **small), predicate, settings=SEARCH)


@pytest.mark.parametrize("kind, name", [(k, n) for k, r in KINDS.items() for n in r.list()])
def test_random_policies_reach_every_registered_component(kind, name):
    if not available(kind, name):
        pytest.skip(f"{kind} {name} needs an optional package")
    find(policies(shape=(1, 2, 64, 64)), lambda p: uses(p, kind, name), settings=SEARCH)


def test_a_newly_registered_component_is_drawn():
    """Strategies read the registries when they draw: a component registered later is covered."""

    @dataclasses.dataclass(frozen=True)
    class SpanMean(qkv.quantizers.Smoother):
        """Subtracts each channel's mean over the span, stored as bf16 (one row, added back)."""

        name: ClassVar[str] = "spanmean"
        undo: ClassVar[Undo] = Undo.ADD

        def forward(self, x, groups, *, backend="auto"):
            mean = x.float().mean(dim=1, keepdim=True).bfloat16()
            return x.float() - mean.float(), mean

    registry = Registry("smoothing")
    for existing in KINDS["smoothing"].list():
        registry.register(existing)(KINDS["smoothing"].get(existing))
    registry.register("spanmean")(SpanMean)
    policy = find(
        tensor_policies(shape=(1, 1, 32, 32), registries={"smoothing": registry}),
        lambda p: p.smoothing.name == "spanmean",
        settings=SEARCH,
    )
    x = torch.randn(1, 1, 32, 32)
    assert_within_bound(qkv.Policy(policy, policy), x)


@given(data=st.data())
def test_drawn_policies_accept_their_shape(data):
    shape = data.draw(kv_shapes(max_tokens=300))
    policy = data.draw(policies(shape=shape))
    assert qkv.build_policy(policy.spec) == policy  # every drawn component is a registered one
    policy.k.check_shape("k", shape)
    q = data.draw(components("quantizer", names=["int3"], shape=shape))
    assert isinstance(q, AffineQuantizer) and q.bits == 3


# -- the property tests of the project ------------------------------------------------------------
@pytest.mark.parametrize("kind, name", [(k, n) for k, r in KINDS.items() for n in r.list()])
def test_every_registered_component_keeps_its_bound(kind, name):
    if not available(kind, name):
        pytest.skip(f"{kind} {name} needs an optional package")

    @given(data=st.data())
    def keeps_bound(data):
        shape = data.draw(kv_shapes(**SMALL))
        policy = data.draw(policies(shape=shape, fixed={kind: name}))
        k, v = data.draw(kv_pairs(shape))
        assert_within_bound(policy, k, v, allow_unbounded=True)

    keeps_bound()


@pytest.mark.parametrize("preset", qkv.list_policies())
@given(data=st.data())
def test_every_preset_keeps_its_bound(preset, data):
    policy = qkv.build_policy(preset)
    if policy.k.grouping.has_param("clusters"):  # fewer clusters than tokens, on short spans
        policy = qkv.build_policy(preset, clusters=data.draw(st.sampled_from([16, 4])))
    shape = data.draw(kv_shapes(max_tokens=256, head_dims=(64, 128), max_batch=1, max_heads=2))
    k, v = data.draw(kv_pairs(shape))
    assert_within_bound(policy, k, v, allow_unbounded=True)


@given(data=st.data())
def test_random_policies_keep_their_bound_on_long_spans(data):
    shape = data.draw(kv_shapes(max_tokens=2048, max_batch=1, max_heads=2))
    policy = data.draw(policies(shape=shape))
    k, v = data.draw(kv_pairs(shape))
    assert_within_bound(policy, k, v, allow_unbounded=True)


# -- a wrong component is caught ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UnderstatedInt2(AffineQuantizer):
    """INT2 under its own name (the bound rule below claims a quarter step for every code)."""

    bits: int = 2

    @property
    def token(self) -> str:
        return "int2-understated"


def understate(monkeypatch, factor):
    """Make the affine bound rule claim ``factor`` times the truth."""
    honest = qkv.bounds.affine_error

    def understated(fmt, scales, zeros, mult):
        state = honest(fmt, scales, zeros, mult)
        return ErrorState(state.bound.map(lambda b: b * factor), state.magnitude)

    monkeypatch.setattr(qkv.bounds, "affine_error", understated)


def test_an_understated_bound_is_caught(monkeypatch):
    understate(monkeypatch, 0.5)
    only = Registry("quantizer")
    only.register("int2-understated")(UnderstatedInt2)

    @settings(database=None, phases=[Phase.generate])  # found at once; the helper minimizes
    @given(data=st.data())
    def keeps_bound(data):
        shape = data.draw(kv_shapes(**SMALL))
        policy = data.draw(policies(shape=shape, registries={"quantizer": only}))
        k, v = data.draw(kv_pairs(shape))
        assert_within_bound(policy, k, v)

    with pytest.raises(BoundViolation, match="exceed the (element|token_l2) bound") as info:
        keeps_bound()
    message = str(info.value)
    assert "minimal failing example" in message and "int2-understated" in message


def test_failure_prints_a_minimal_reproducer(monkeypatch):
    """The message cuts the input to the failing (batch, head) and few tokens, and its code
    reproduces the failure as printed."""
    understate(monkeypatch, 0.4)
    policy = qkv.build_policy("int2(block=16,mode=sym)")  # levels -1, 0, 1 (x the block's max)
    k = torch.zeros(2, 3, 64, 32)
    k[1, 2, 37, 5] = 1.0
    k[1, 2, 37, 6] = 0.1  # error 0.1: inside 0.4 * half a step (0.2)
    k[1, 2, 37, 7] = 0.4  # error 0.4: outside, the worst
    with pytest.raises(BoundViolation) as info:
        assert_within_bound(policy, k, torch.zeros_like(k))
    message = str(info.value)
    assert "worst at [1, 2, 37, 7]" in message and "x = 0.400000006" in message
    assert "to the failing (batch, head) and 1 token)" in message
    code = textwrap.dedent(message.split("minimal failing example")[1].split(":\n", 1)[1])
    with pytest.raises(BoundViolation, match="worst at \\[0, 0, 0, 7\\]"):
        exec(code, {})  # noqa: S102


def test_unbounded_reconstructions_fail_by_default(monkeypatch):
    """A bound rule that gives no guarantee (inf) for each row's largest elements."""
    honest = qkv.bounds.affine_error

    def gives_up_on_peaks(fmt, scales, zeros, mult):
        state = honest(fmt, scales, zeros, mult)
        peak = state.magnitude >= state.magnitude.amax(dim=(1, 2), keepdim=True)
        return ErrorState(state.bound.plus(torch.where(peak, float("inf"), 0.0).double()), state.magnitude)

    monkeypatch.setattr(qkv.bounds, "affine_error", gives_up_on_peaks)
    x = torch.randn(1, 1, 4, 16)
    tensor = TensorPolicy(AffineQuantizer(bits=2, block=16))
    policy = qkv.Policy(tensor, tensor)
    with pytest.raises(BoundViolation, match="no guarantee"):
        assert_within_bound(policy, x)
    assert bool(assert_within_bound(policy, x, allow_unbounded=True).k.unbounded.any())


# -- defects the kit found, fixed: reconstructions and stored offsets saturate to the finite range
# of their format (qkv.dtypes.saturate); the faiss grouper normalizes rows as kmeans does ----------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_inputs_at_their_largest_value_reconstruct_finite(backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend runs where x is
    x = torch.full((1, 1, 4, 16), 65504.0, dtype=torch.float16, device=device)
    x[..., 1::2] = -65504.0
    for name in ("rtn", "bf16", "quarot"):
        policy = qkv.build_policy(name)
        k_hat = policy.decompress(policy.compress(x, x, backend=backend), backend=backend)[0]
        assert bool(torch.isfinite(k_hat).all()), name
        assert_within_bound(policy, x)


def test_fp16_centroids_of_large_inputs_stay_finite():
    policy = qkv.build_policy("kmeans(clusters=2,iters=1),centroid(dtype=fp16),int2(block=16)")
    x = torch.randn(1, 1, 32, 16) * 1e6
    ckv = policy.compress(x, x)
    assert float(ckv.k.stages[0].centroids.float().abs().max()) == 65504.0  # saturated, not inf
    assert bool(torch.isfinite(policy.decompress(ckv)[0]).all())
    assert_within_bound(policy, x)


@pytest.mark.skipif(not available("grouping", "faiss"), reason="needs faiss")
def test_faiss_grouper_survives_large_inputs():
    code = (
        "import torch, qkv; x = torch.randn(1, 1, 64, 16) * 2.0**100;"
        "p = qkv.build_policy('faiss(clusters=8,iters=3),centroid,int2(block=16)'); p.compress(x, x)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
