"""qkv.readback.Arriving: a small tensor's values sent to the host without waiting."""

import pytest
import torch

from qkv.readback import Arriving


def test_the_values_are_those_at_sending_and_at_hand_off_a_gpu():
    t = torch.tensor([1.0, 2.0])
    sent = Arriving(t)
    t.add_(10)  # a later write does not reach them
    assert sent.ready() and sent.values() == [1.0, 2.0]
    assert Arriving(torch.tensor(True)).values() is True  # a 0-d tensor gives its number


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_sending_never_waits():
    t = torch.arange(4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # a read-back that waits for the GPU raises
    try:
        sent = Arriving(t * 2)
        sent.ready()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sent.values() == [0, 2, 4, 6]
