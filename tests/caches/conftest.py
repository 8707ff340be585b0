import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test on one intra-op thread: the streaming-cache tests push many tiny tensors, for which
    a thread pool only adds wake-up latency (badly so when other processes share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
