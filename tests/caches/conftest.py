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


@pytest.fixture
def bounded_spans(monkeypatch):
    """Every span a ``LayerCache`` compresses is checked against its policy's guaranteed error
    bound (``Policy.error_bound(...).check`` raises if one fails); returns the list of them."""
    from qkv.caches.layer_cache import LayerCache

    compress = LayerCache._compress
    checked = []

    def checked_compress(self, k, v, warm):
        ckv = compress(self, k, v, warm)
        policy = self.config.span_policy
        k_hat, v_hat = policy.decompress(ckv)
        policy.error_bound(ckv, k_hat, v_hat).check(k, v, k_hat, v_hat)
        checked.append(ckv)
        return ckv

    monkeypatch.setattr(LayerCache, "_compress", checked_compress)
    return checked


@pytest.fixture
def compress_passes(monkeypatch):
    """The pairs of every ``Policy.compress_many`` call (one compression pass each), in order:
    the list, which a test may clear between runs."""
    from qkv.caches.policy import Policy

    compress_many = Policy.compress_many
    passes = []

    def counting(self, pairs, **kwargs):
        passes.append(len(pairs))
        return compress_many(self, pairs, **kwargs)

    monkeypatch.setattr(Policy, "compress_many", counting)
    return passes
