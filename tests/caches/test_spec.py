import pytest
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.errors import ConfigError, SpecError, UnknownComponentError
from qkv.spec import KINDS, parse_tensor_spec


@pytest.mark.parametrize("name", qkv.list_policies())
def test_preset_spec_round_trip(name):
    policy = qkv.build_policy(name)
    again = qkv.build_policy(policy.spec)
    assert again == policy and again.spec == policy.spec


@st.composite
def tensor_specs(draw):
    quant = draw(st.sampled_from(["int2", "int3(block=16,mode=asym)", "int4(mode=sym,scale=bf16)",
                                  "int1(block=32)", "int8(axis=channel,block=16)", "bf16", "fp16"]))
    parts = [quant]
    if not quant.startswith(("bf16", "fp16")):
        smoothing = draw(st.sampled_from(["none", "hadamard", "kmeans", "faiss", "blocks"]))
        if smoothing == "hadamard":
            parts.insert(0, "hadamard")
        elif smoothing in ("kmeans", "faiss"):
            clusters = draw(st.integers(1, 300))
            parts[:0] = [f"{smoothing}(clusters={clusters},iters={draw(st.integers(1, 30))})", "centroid"]
            stages = draw(st.integers(1, 4))
            if stages > 1:
                parts.insert(2, f"progressive(stages={stages})")
        elif smoothing == "blocks":
            parts[:0] = ["blocks(t=2,h=4,w=4,height=8,width=8)", "centroid(dtype=fp16)"]
        if draw(st.booleans()):
            parts.append("i32lsb")
    if draw(st.booleans()):
        parts.append(f"window(tokens={draw(st.integers(1, 256))})")
    return ",".join(draw(st.permutations(parts)))


@given(k=tensor_specs(), v=tensor_specs())
def test_random_spec_round_trip(k, v):
    policy = qkv.build_policy(f"k:{k};v:{v}")
    assert qkv.build_policy(policy.spec) == policy
    assert qkv.build_policy(policy.spec).spec == policy.spec
    same = qkv.build_policy(k)
    assert same.k == same.v and ";" not in same.spec


def test_component_names_are_unique_across_kinds():
    names = [n for registry in KINDS.values() for n in registry.list() if n != "none"]
    assert len(names) == len(set(names))


def test_overrides_documented_and_applied():
    p = qkv.build_policy("qvg", clusters=64, bits=4, block=32, stages=3, iters=5)
    assert p.k.grouping.clusters == 64 and p.k.quantizer.bits == 4 and p.k.quantizer.block == 32
    assert p.k.staging.count == 3 and p.k.grouping.iters == 5
    assert qkv.build_policy(p.spec) == p and p.name.startswith("qvg(")
    assert qkv.build_policy("qvg-pro", stages=1).k.staging.name == "single"
    with pytest.raises(ConfigError, match="does not apply"):
        qkv.build_policy("rtn", clusters=4)
    with pytest.raises(ConfigError, match="valid overrides"):
        qkv.build_policy("qvg", colour="red")


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("kmeans(clusters=4),centroid", SpecError, "no quantizer"),
        ("int2,int4", SpecError, "two quantizer"),
        ("int2(block=16", SpecError, "unbalanced"),
        ("int2(blk=16)", SpecError, "bad arguments"),
        ("int2(block)", SpecError, "key=value"),
        ("flux,int2", UnknownComponentError, "valid names: .*kmeans"),
        ("int2,window(8)", SpecError, "key=value"),
        ("k:int2", SpecError, "k:<spec>;v:<spec>"),
        ("int2(mode=fancy)", ConfigError, "sym, midrise, asym"),
        ("", SpecError, "non-empty"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        qkv.build_policy(spec)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UnknownComponentError, match="presets: qvg, qvg-pro"):
        qkv.build_policy("qvgg")


def test_three_ways_build_the_same_policy():
    from qkv.caches import Policy, TensorPolicy
    from qkv.grouping import KMeansGrouper
    from qkv.quantizers import AffineQuantizer, CentroidSmoother

    tensor = TensorPolicy(
        grouping=KMeansGrouper(clusters=256, iters=5, init="random"),
        smoothing=CentroidSmoother(),
        quantizer=AffineQuantizer(bits=2, block=64),
    )
    assert Policy(tensor, tensor) == qkv.build_policy("qvg") == qkv.build_policy(qkv.build_policy("qvg").spec)
    assert TensorPolicy(**parse_tensor_spec("int2,kmeans(iters=5,init=random),centroid")) == tensor
