"""Compression reads nothing back to the host that it can do without: on a GPU every read-back
(``.item()``, ``.tolist()``, ``bool(tensor)``, ...) waits for the queue to drain and keeps the call
out of a CUDA graph. Counted here on the CPU by wrapping the tensor methods that read back: with
``validate=False`` only k-means's row scaling reads back (one check per smoothing stage, for K and V
together, whether any row needs scaling), and the checked path adds one read-back for the value
check."""

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


@pytest.mark.parametrize("name, stages", [("qvg", 1), ("qvg-pro", 4), ("kivi", 0), ("rtn", 0), ("quarot", 0)])
def test_compress_reads_back_only_to_decide_row_scaling(name, stages, read_backs):
    policy = qkv.build_policy(name)
    k, v = torch.randn(1, 4, 256, 64).bfloat16(), torch.randn(1, 4, 256, 64).bfloat16()
    policy.compress(k, v, validate=False)
    assert len(read_backs) == stages, read_backs
    read_backs.clear()
    policy.compress(k, v)
    assert len(read_backs) == stages + 1, read_backs
