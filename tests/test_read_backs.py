"""Compression reads nothing back to the host that it can do without: on a GPU every read-back
(``.item()``, ``.tolist()``, ``bool(tensor)``, ...) waits for the queue to drain and keeps the call
out of a CUDA graph. Counted here on the CPU by wrapping the tensor methods that read back: with
``validate=False`` nothing is read back (k-means's row scaling is a per-row factor the k-means ops
apply as they read the tokens), and the checked path reads back once, for the value check."""

import pytest
import torch

import qkv

READ_BACKS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.fixture
def read_backs(monkeypatch):
    calls = []
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


@pytest.mark.parametrize("name", ["qvg", "qvg-pro", "kivi", "rtn", "quarot",
                                  "kmeans(clusters=16,init=kmeans||),centroid,int2(block=64)",
                                  "kmeans(clusters=16,init=kmeans++),centroid,int2(block=64)"])
@pytest.mark.parametrize("far", [False, True])  # a row far outside the safe range (scaled by k-means)
def test_compress_reads_back_only_for_the_value_check(name, far, read_backs):
    policy = qkv.build_policy(name)
    k, v = torch.randn(1, 4, 256, 64).bfloat16(), torch.randn(1, 4, 256, 64).bfloat16()
    if far:
        k[:, 1] *= 2.0**60
    policy.compress(k, v, validate=False)
    assert read_backs == []
    policy.compress(k, v)
    assert len(read_backs) == 1, read_backs
