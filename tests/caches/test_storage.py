import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qkv
from qkv.errors import CorruptDataError


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


def _rewrite(path, edit):
    """Re-save with edited tensors/header and a recomputed checksum (a deliberate forgery)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    header = json.loads(meta["header"])
    edit(tensors, header)
    meta["header"] = json.dumps(header, sort_keys=True)
    meta["sha256"] = qkv.io.digest(tensors, meta["header"])
    save_file(tensors, str(path), metadata=meta)


def _rtn_format(m):
    m["k"]["format"] = qkv.build_policy("rtn").k.format(64).to_dict()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t, m: t.__setitem__("k.codes", t["k.codes"][:, :, :-1].contiguous()), "k.codes: expected shape"),
        (lambda t, m: t.__setitem__("v.stage0.assignments", t["v.stage0.assignments"].fill_(200)), "outside"),
        (lambda t, m: t.pop("k.scales"), "k.scales: missing"),
        (lambda t, m: _rtn_format(m), r"k\.(stage|scales)|stages|present"),
        (lambda t, m: m["k"].__setitem__("shape", [2, 3, 200]), "invalid shape"),
        (lambda t, m: m["k"]["format"].__setitem__("head_dim", 128), "invalid shape"),
        (lambda t, m: t.__setitem__("k.extra", torch.zeros(1)), "unexpected"),
    ],
)
def test_consistent_forgeries_are_rejected(tmp_path, edit, match):
    _, ckv = sample("qvg")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    _rewrite(path, edit)
    with pytest.raises(CorruptDataError, match=match):
        qkv.CompressedKV.load(path)


def test_no_pickle_in_file(tmp_path):
    _, ckv = sample("kivi")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "qkv.compressed_kv"


def test_a_file_of_another_version_is_refused(tmp_path):
    _, ckv = sample("rtn")
    path = tmp_path / "span.safetensors"
    qkv.io.write(path, "qkv.compressed_kv", "1", {}, {})
    with pytest.raises(CorruptDataError, match="version"):
        qkv.CompressedKV.load(path)


def test_loading_needs_no_policy(tmp_path):
    """A file decodes from its stored formats alone: here the spec is not even a valid spec."""
    _, ckv = sample("qvg")
    path = tmp_path / "span.safetensors"
    ckv.save(path)
    _rewrite(path, lambda t, m: m.__setitem__("spec", "made by hand"))
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
