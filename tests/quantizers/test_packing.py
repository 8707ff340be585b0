import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qkv.errors import ConfigError, DTypeError, ShapeError, UnknownComponentError
from qkv.quantizers import PACKING


@given(
    name=st.sampled_from(["u8msb", "i32lsb"]),
    bits=st.integers(1, 8),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_exact(name, bits, shape, n, seed):
    packer = PACKING.build(name)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*shape, n), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = packer.pack(codes, bits)
    assert packed.dtype == packer.container
    assert packed.shape == (*shape, packer.packed_len(n, bits))
    assert torch.equal(packer.unpack(packed, bits, n), codes)


def test_u8msb_is_qvg_byte_layout():
    packer = PACKING.build("u8msb")
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 0, 1], dtype=torch.uint8)
    assert packer.pack(codes, 2).tolist() == [1 << 6 | 2 << 4 | 3 << 2 | 0, 3 << 6 | 3 << 4 | 0 | 1]
    assert packer.pack(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0xA5]


def test_i32lsb_is_kivi_layout():
    packer = PACKING.build("i32lsb")
    codes = torch.tensor([i % 4 for i in range(16)], dtype=torch.uint8)
    expected = sum(int(c) << (2 * i) for i, c in enumerate(codes))
    word = packer.pack(codes, 2).item() % 2**32
    assert word == expected
    assert packer.pack(torch.full((8,), 0xF, dtype=torch.uint8), 4).item() == -1


def test_packing_errors():
    packer = PACKING.build("u8msb")
    with pytest.raises(ConfigError, match="bits"):
        packer.pack(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(DTypeError):
        packer.pack(torch.zeros(4, dtype=torch.int32), 2)
    with pytest.raises(ShapeError):
        packer.unpack(torch.zeros(3, dtype=torch.uint8), 2, 4)
    with pytest.raises(UnknownComponentError, match="i32lsb, u8msb"):
        PACKING.build("u4")
