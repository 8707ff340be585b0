import os

# Parallel workers (pytest-xdist, -n) share the cores: each takes its part of them for torch's
# threads, set before torch is imported (threads that outnumber the cores spin while they wait for
# each other, which made the suite slower on two cores than one thread a worker).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter (numpy) so CI checks them too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _fake_dataset(name, progress=True):
    """Two random layers [1, 3, 96, 64] labelled like the real datasets."""
    from qkv.realdata import KVSample

    gen = torch.Generator().manual_seed(len(name))
    return [
        KVSample(name, layer, torch.randn(1, 3, 96, 64, generator=gen), torch.randn(1, 3, 96, 64, generator=gen),
                 f"fake {name} L{layer} (random)")
        for layer in range(2)
    ]


@pytest.fixture
def fake_realdata(monkeypatch):
    """``qkv eval`` on :func:`_fake_dataset` instead of the real K/V; the process's malloc left alone."""
    from qkv.evaluation import run

    monkeypatch.setattr(run, "load_dataset", _fake_dataset)
    monkeypatch.setattr(run, "keep_freed_memory", lambda: False)
    return _fake_dataset
