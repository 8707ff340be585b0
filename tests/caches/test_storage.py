import json
import time
from datetime import timedelta

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.errors import CorruptDataError
from forgery import forge, read_raw, write_raw


def sample(name):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 200, 64, generator=gen).bfloat16()
    v = torch.randn(2, 3, 200, 64, generator=gen).bfloat16()
    policy = qkv.build_policy(name, **({"clusters": 16, "iters": 2} if "qvg" in name else {}))
    return policy, policy.compress(k, v)


@pytest.mark.parametrize("name", qkv.list_policies())
def test_save_load_is_bit_exact(tmp_path, name):
    policy, ckv = sample(name)
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    loaded = qkv.CompressedKV.load(path)
    assert loaded.spec == ckv.spec and loaded.nbytes == ckv.nbytes
    for a, b in ((ckv.k, loaded.k), (ckv.v, loaded.v)):
        assert a.shape == b.shape and a.dtype == b.dtype and a.quantized_tokens == b.quantized_tokens
        for (na, ta), (nb, tb) in zip(sorted(a.tensors().items()), sorted(b.tensors().items())):
            assert na == nb and ta.dtype == tb.dtype and torch.equal(ta.view(torch.uint8), tb.view(torch.uint8))
    for x, y in zip(policy.decompress(ckv), policy.decompress(loaded)):
        assert torch.equal(x, y)


def test_truncated_file(tmp_path):
    _, ckv = sample("qvg")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptDataError, match="not a readable safetensors"):
            qkv.CompressedKV.load(path)


def test_flipped_bit_is_detected(tmp_path):
    _, ckv = sample("qvg")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptDataError, match="checksum"):
        qkv.CompressedKV.load(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t, m: t.__setitem__("k.codes", t["k.codes"][:, :, :-1].contiguous()), "k.codes: expected shape"),
        (lambda t, m: t.__setitem__("v.stage0.assignments", t["v.stage0.assignments"].fill_(200)), "outside"),
        (lambda t, m: t.pop("k.scales"), "k.scales: missing"),
        (lambda t, m: m["k"].__setitem__("format", qkv.build_policy("rtn").k.format(64).to_dict()), r"k\.(stage|scales)|stages|present"),
        (lambda t, m: m["k"].__setitem__("shape", [2, 3, 200]), "expected 4 positive integers"),
        (lambda t, m: m["k"]["format"].__setitem__("head_dim", 128), "invalid shape"),
        (lambda t, m: m["k"]["format"]["codes"].__setitem__("bits", 9), "format.*bits"),
        (lambda t, m: t.__setitem__("k.extra", torch.zeros(1)), "unexpected"),
    ],
)
def test_consistent_forgeries_are_rejected(tmp_path, edit, match):
    _, ckv = sample("qvg")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    forge(path, edit)
    with pytest.raises(CorruptDataError, match=match):
        qkv.CompressedKV.load(path)


def test_no_pickle_in_file(tmp_path):
    _, ckv = sample("kivi")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "qkv.compressed_kv"


def test_loading_needs_no_policy(tmp_path):
    """A file decodes from its stored formats alone: here the spec is not even a valid spec."""
    _, ckv = sample("qvg")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    forge(path, lambda t, h: h.__setitem__("spec", "made by hand"))
    loaded = qkv.CompressedKV.load(path)
    for a, b in ((ckv.k, loaded.k), (ckv.v, loaded.v)):
        assert a.format == b.format and torch.equal(qkv.kernels.decompress(a), qkv.kernels.decompress(b))


@pytest.mark.parametrize("name", qkv.list_policies())
@pytest.mark.parametrize("tokens", [5, 100, 333])
def test_predicted_nbytes_is_exact(name, tokens):
    policy = qkv.build_policy(name, **({"clusters": 16, "iters": 1} if "qvg" in name else {}))
    k = torch.randn(1, 2, tokens, 64, dtype=torch.float16)
    ckv = policy.compress(k, k)
    assert policy.k.predicted_nbytes(tuple(k.shape), k.dtype) == ckv.k.nbytes
    assert policy.v.predicted_nbytes(tuple(k.shape), k.dtype) == ckv.v.nbytes


# -- re-signed forgeries: every header field and stored value is checked --------------------------

MIXED = "k:kmeans(clusters=4,iters=2),centroid,int2(block=32),window(tokens=8);v:int2(block=32,mode=asym,axis=channel,scale=fp16),i32lsb,window(tokens=8)"


def mixed_sample() -> qkv.CompressedKV:
    """Small, with every kind of stored tensor (codes, fp8 and fp16 scales, zeros, multipliers,
    centroids, assignments, full-precision tokens)."""
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 2, 48, 64, generator=gen) for _ in range(2))
    return qkv.build_policy(MIXED).compress(k, v)


def nan_at_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).view(-1)[0] = 0x7F  # E4M3's NaN
    else:
        t.view(-1)[0] = float("nan")
    return t


@pytest.mark.parametrize("name", ["k.scales", "k.scale_mult", "k.stage0.centroids", "k.fp_tokens", "v.scales", "v.zeros", "v.fp_tokens"])
def test_resigned_nan_is_rejected(tmp_path, name):
    path = tmp_path / "span.safetensors"
    mixed_sample().save(path)
    forge(path, lambda t, h: t.__setitem__(name, nan_at_first(t[name])))
    with pytest.raises(CorruptDataError, match="NaN"):
        qkv.CompressedKV.load(path)


def test_resigned_header_values_are_checked_before_use(tmp_path):
    path = tmp_path / "span.safetensors"
    mixed_sample().save(path)
    data = path.read_bytes()
    edits = {
        "stages": lambda h: h["k"].__setitem__("stages", 10**9),  # hung: a billion stages built
        "quantized_tokens": lambda h: h["k"].__setitem__("quantized_tokens", -1),
        "shape": lambda h: h["k"].__setitem__("shape", [1, 2, 48.0, 64]),
        "dtype": lambda h: h["v"].__setitem__("dtype", "torch.int64"),
        "format": lambda h: h["k"]["format"].__setitem__("stages", [{}] * 10**6),
        "header": lambda h: h.pop("k"),
    }
    for field_name, edit in edits.items():
        path.write_bytes(data)
        forge(path, lambda t, h: edit(h))
        start = time.perf_counter()
        with pytest.raises(CorruptDataError) as err:
            qkv.CompressedKV.load(path)
        assert time.perf_counter() - start < 2, field_name
        assert len(str(err.value)) < 400, field_name  # quotes a cut of the input, not all of it


def _json_values():
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 10**9, 2**63]),
        st.floats(allow_nan=True), st.text(max_size=8), st.sampled_from(["torch.float32", "torch.bfloat16", "int2", "bf16"]),
    )
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def edit_header(data, header: dict) -> None:
    """One random edit somewhere in ``header``: a value replaced, a key dropped or one added."""
    node = header
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], (dict, list)) or not node[key] or data.draw(st.booleans()):
            break
        node = node[key]
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        node[key] = data.draw(_json_values())
    elif action == "drop" and isinstance(node, dict):
        del node[key]
    elif isinstance(node, dict):
        node[data.draw(st.text(min_size=1, max_size=4))] = data.draw(_json_values())


def edit_tensors(data, tensors: dict) -> None:
    """One random structural edit: a tensor dropped, added, cut, retyped, or given a NaN."""
    name = data.draw(st.sampled_from(sorted(tensors)))
    t = tensors[name]
    action = data.draw(st.sampled_from(["drop", "add", "cut", "retype", "nan"]))
    if action == "drop":
        del tensors[name]
    elif action == "add":
        tensors[name + "x"] = t.clone()
    elif action == "cut" and t.dim() and t.shape[-1] > 1:
        tensors[name] = t[..., :-1].contiguous()
    elif action == "retype":
        tensors[name] = t.view(torch.uint8) if t.dtype != torch.uint8 else t.to(torch.int16)
    elif action == "nan" and t.is_floating_point():
        tensors[name] = nan_at_first(t)


def same_data(a: qkv.CompressedKV, b: qkv.CompressedKV) -> bool:
    """Same formats and stored tensors (the spec is a label: nothing is built or read from it)."""
    for x, y in ((a.k, b.k), (a.v, b.v)):
        if (x.format, x.shape, x.dtype, x.quantized_tokens, sorted(x.tensors())) != (y.format, y.shape, y.dtype, y.quantized_tokens, sorted(y.tensors())):
            return False
        if not all(torch.equal(t.view(torch.uint8), y.tensors()[n].view(torch.uint8)) for n, t in x.tensors().items()):
            return False
    return True


@settings(max_examples=40, deadline=timedelta(seconds=5))
@given(data=st.data())
def test_fuzzed_files_load_identically_or_raise_corrupt_data(tmp_path_factory, data):
    """Random edits of a valid file: header fields and tensor structure, signed again or not, and
    random bytes (not signed again: a forger who re-signs may of course store other codes)."""
    original = mixed_sample()
    path = tmp_path_factory.mktemp("fuzz") / "span.safetensors"
    original.save(path)
    kind = data.draw(st.sampled_from(["header", "tensors", "bytes"]))
    if kind == "bytes":
        raw = bytearray(path.read_bytes())
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(raw[: data.draw(st.integers(0, len(raw)))] if data.draw(st.booleans()) else raw))
    else:
        tensors, meta, header = read_raw(path)
        (edit_header(data, header) if kind == "header" else edit_tensors(data, tensors))
        write_raw(path, tensors, meta, header, sign=data.draw(st.booleans()))
    try:
        loaded = qkv.CompressedKV.load(path)
    except CorruptDataError:
        return
    assert same_data(original, loaded)
