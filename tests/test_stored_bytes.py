"""Every preset stores exactly the bytes it stored when this file's digests were written
(``tests/data/stored_bytes.json``): refactors of the format, kernels or policies must not change
what is stored. Regenerate only for a deliberate format change:
``python3 tests/test_stored_bytes.py > tests/data/stored_bytes.json``."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch

import qkv

DIGESTS = pathlib.Path(__file__).parent / "data" / "stored_bytes.json"


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shape = (2, 3, 320, 64)
    offsets = torch.randn(2, 3, 1, 64, generator=g) * 4
    k = (torch.randn(shape, generator=g) + offsets).to(torch.bfloat16)
    v = torch.randn(shape, generator=g).to(torch.bfloat16)
    return k, v


def digest(preset: str) -> dict[str, str]:
    """Stored tensor name (``k.codes``, ``v.stage0.centroids``, ...) -> dtype, shape and sha256 of
    its bytes, for ``preset`` compressing :func:`_inputs` on the plain-torch path."""
    data = qkv.build_policy(preset).compress(*_inputs(), backend="torch")
    return {
        f"{side}.{key}": f"{t.dtype}:{list(t.shape)}:"
        + hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for side, ct in (("k", data.k), ("v", data.v))
        for key, t in sorted(ct.tensors().items())
    }


@pytest.mark.parametrize("preset", qkv.list_policies())
def test_presets_store_the_same_bytes(preset):
    expected = json.loads(DIGESTS.read_text())[preset]
    assert digest(preset) == expected


if __name__ == "__main__":
    print(json.dumps({name: digest(name) for name in qkv.list_policies()}, indent=1, sort_keys=True))
