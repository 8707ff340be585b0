"""KVCache.attend: the fused and staged paths against read + SDPA.

Each is compared with an fp32 attention over the decompressed history (``read()`` upcast); its
error must be at most twice the read path's, in max and in mean (see
tests/kernels/test_attention.py). Covers sink chunks, spans with evicted leading tokens, the tail,
a policy window (KIVI), GQA and a current chunk passed as ``extra``.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.errors import CacheError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def chunk(seed, h=2, n=32, d=64):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, h, n, d, generator=g) * 2, torch.randn(1, h, n, d, generator=g)
    return k.bfloat16().to(DEVICE), v.bfloat16().to(DEVICE)


def filled(policy, chunks=8, **options):
    cache = qkv.KVCache(policy, **options)
    for i in range(chunks):
        cache.append(0, *chunk(i))
    return cache


def attend_all(cache, q, extra=None):
    """Outputs of the same cache state by option: the decode and fused Triton kernels (Triton's
    interpreter on a CPU), the default ("auto" method and backend: the plain-torch twin on a CPU),
    staged (one span decompressed at a time, torch's fused attention), read."""
    out = {}
    for name, options in (("decode", {"backend": "triton", "attention": "decode"}),
                          ("fused", {"backend": "triton", "attention": "fused"}), ("auto", {}),
                          ("staged", {"attention": "staged"}), ("read", {"attention": "read"})):
        cache.layer(0).config = dataclasses.replace(cache.config, **options)
        out[name] = cache.attend(0, q, extra=extra)
    cache.layer(0).config = cache.config
    return out


def assert_within_twice_the_read_error(cache, q, extra=None):
    """Every option vs an fp32 attention over the read history: at most twice the read path's error
    (staged: plus one rounding of its partial outputs, each at most max |v|; see
    tests/kernels/test_attention.py)."""
    outs = attend_all(cache, q, extra)
    k, v = cache.read(0) if cache.layer(0).layout is not None else extra
    if extra is not None and cache.layer(0).layout is not None:
        k, v = torch.cat([k, extra[0]], 2), torch.cat([v, extra[1]], 2)
    gqa = q.shape[1] != k.shape[1]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=gqa)
    base = (outs.pop("read").float() - ref).abs()
    for name, out in outs.items():
        err = (out.float() - ref).abs()
        slack = torch.finfo(q.dtype).eps / 2 * v.float().abs().max() if name == "staged" else 0.0
        assert out.shape == q.shape and out.dtype == q.dtype
        assert err.max() <= 2 * base.max() + slack and err.mean() <= 2 * base.mean(), name


def test_sink_spans_eviction_tail_and_extra():
    cache = filled(qkv.build_policy("qvg", clusters=8, block=32), span_chunks=2, sink_chunks=1)
    layer = cache.layer(0)
    layer.evict(40)  # inside the first span: per-token codes, its first 40 tokens are dropped
    assert len(layer.sink) == 1 and len(layer.spans) == 3 and layer.tail
    assert layer.spans[0].skip == 0 and layer.spans[0].tokens == 64 - 40
    q = chunk(100, n=24)[0]
    assert_within_twice_the_read_error(cache, q)
    assert_within_twice_the_read_error(cache, q, extra=chunk(101))


def test_policy_window_and_gqa():
    cache = filled(qkv.build_policy("kivi"), chunks=9, span_chunks=2)
    layer = cache.layer(0)
    layer.evict(40)  # the first 32-token span goes; the next one's keys share a 32-token block
    assert layer.spans[0].skip == 8 and layer.spans[0].ckv.k.shape[2] == 32 and layer.memory().dead_tokens == 8
    assert layer.spans and sum(c.tokens for c in layer.tail) >= 128  # KIVI's full-precision window
    q = torch.randn(1, 4, 16, 64, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEVICE)  # 4 heads on 2
    assert_within_twice_the_read_error(cache, q)


@pytest.mark.parametrize("evict", [40, 64 + 32])
def test_per_channel_spans_cut_by_an_eviction(evict):
    """KIVI's keys without a window, spans of 64 tokens (two key blocks): an eviction drops whole
    blocks from the first span (new, shorter codes and scales) and skips the rest of a block."""
    cache = filled(qkv.build_policy("kivi", window=0), chunks=7, span_chunks=2)
    layer = cache.layer(0)
    layer.evict(evict)
    span = layer.spans[0]
    assert span.ckv.k.shape[2] == 32 and span.skip == evict % 32 and span.tokens == 32 - evict % 32
    q = chunk(102, n=16)[0]
    assert_within_twice_the_read_error(cache, q)


def test_an_empty_layer_attends_to_extra_only():
    cache = qkv.KVCache("rtn")
    q, extra = chunk(3, n=8)[0], chunk(4)
    assert_within_twice_the_read_error(cache, q, extra)
    with pytest.raises(CacheError, match="holds nothing"):
        cache.attend(0, q)


@pytest.mark.parametrize("mode", ["staged", "read"])
def test_the_attention_option_is_checked_and_survives_save_and_load(tmp_path, mode):
    with pytest.raises(ConfigError, match="attention"):
        qkv.KVCache("rtn", attention="decompress")
    cache = filled("rtn", chunks=3, span_chunks=2, attention=mode)
    cache.save(tmp_path)
    assert qkv.KVCache.load(tmp_path).config.attention == mode
