"""qkv.io: signed files that are byte-identical for identical data, created like any other file."""

from __future__ import annotations

import os

import pytest
import torch

import qkv
from qkv import io
from qkv.errors import CorruptDataError, DeviceError


def sample() -> qkv.CompressedKV:
    k = torch.randn(1, 2, 40, 64, generator=torch.Generator().manual_seed(0))
    return qkv.build_policy("qvg", clusters=4).compress(k, k + 1)


def test_identical_data_gives_identical_files(tmp_path):
    ckv = sample()
    for i in range(4):  # safetensors writes its metadata in hash-map order: differed between saves
        ckv.save(tmp_path / f"{i}.safetensors")
    assert len({(tmp_path / f"{i}.safetensors").read_bytes() for i in range(4)}) == 1
    cache = qkv.KVCache("rtn", span_chunks=1)
    for _ in range(3):
        cache.append(0, torch.ones(1, 2, 4, 64), torch.ones(1, 2, 4, 64))
    cache.save(tmp_path / "a")
    cache.save(tmp_path / "b")
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_files_follow_the_umask(tmp_path):
    before = os.umask(0o022)
    try:
        sample().save(tmp_path / "span.safetensors")
    finally:
        os.umask(before)
    assert (tmp_path / "span.safetensors").stat().st_mode & 0o777 == 0o644  # was 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["span.safetensors"]  # no partial file left


def test_saving_into_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample().save(tmp_path / "missing" / "span.safetensors")


def test_read_checks_kind_version_and_digest(tmp_path):
    path = tmp_path / "x.safetensors"
    io.write(path, "kind", "1", {"a": torch.arange(4)}, {"n": 1})
    tensors, header, sha = io.read(path, "kind", "1")
    assert torch.equal(tensors["a"], torch.arange(4)) and header == {"n": 1} and len(sha) == 64
    with pytest.raises(CorruptDataError, match="not a other file"):
        io.read(path, "other", "1")
    data = path.read_bytes()
    assert data.count(b'{\\"n\\": 1}') == 1
    path.write_bytes(data.replace(b'{\\"n\\": 1}', b'{\\"n\\": 2}'))
    with pytest.raises(CorruptDataError, match="checksum"):
        io.read(path, "kind", "1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "nonsense", 3.5])
def test_loading_onto_a_device_that_is_not_here_is_a_device_error(tmp_path, device):
    sample().save(tmp_path / "span.safetensors")
    with pytest.raises(DeviceError):
        qkv.CompressedKV.load(tmp_path / "span.safetensors", device=device)
    with pytest.raises(DeviceError):
        qkv.KVCache.load(tmp_path, device=device)


def test_stored_nan_is_rejected_and_inf_only_where_allowed():
    io.check_stored("x", torch.tensor([1.0, float("inf")]), inf_ok=True)
    with pytest.raises(CorruptDataError, match="x: 1 stored NaN values"):
        io.check_stored("x", torch.tensor([1.0, float("nan")]), inf_ok=True)
    with pytest.raises(CorruptDataError, match="NaN/Inf"):
        io.check_stored("x", torch.tensor([float("inf")], dtype=torch.bfloat16))
    io.check_stored("codes", torch.tensor([255], dtype=torch.uint8))
