"""KVCache.attend: the fused path (compressed spans read directly) against read + SDPA.

Both are compared with an fp32 attention over the decompressed history (``read()`` upcast); the
fused output's error must be at most twice the unfused one's, in max and in mean (see
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
    """Outputs of the same cache state: fused through the Triton kernel (Triton's interpreter on a
    CPU), fused with the cache's backend ("auto": the plain-torch twin on a CPU, the kernel on a
    GPU), and unfused."""
    out = []
    for options in ({"backend": "triton"}, {}, {"fused_attention": False}):
        cache.layer(0).config = dataclasses.replace(cache.config, **options)
        out.append(cache.attend(0, q, extra=extra))
    cache.layer(0).config = cache.config
    return out


def assert_fused_within_twice_the_unfused_error(cache, q, extra=None):
    *fused_outputs, plain = attend_all(cache, q, extra)
    k, v = cache.read(0)
    if extra is not None:
        k, v = torch.cat([k, extra[0]], 2), torch.cat([v, extra[1]], 2)
    gqa = q.shape[1] != k.shape[1]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=gqa)
    base = (plain.float() - ref).abs()
    for fused in fused_outputs:
        err = (fused.float() - ref).abs()
        assert fused.shape == q.shape and fused.dtype == q.dtype
        assert err.max() <= 2 * base.max() and err.mean() <= 2 * base.mean()


def test_sink_spans_eviction_tail_and_extra():
    cache = filled(qkv.build_policy("qvg", clusters=8, block=32), span_chunks=2, sink_chunks=1)
    layer = cache.layer(0)
    layer.evict(40)  # inside the first span: it is read from token 40 on
    assert len(layer.sink) == 1 and len(layer.spans) == 3 and layer.spans[0].skip == 40 and layer.tail
    q = chunk(100, n=24)[0]
    assert_fused_within_twice_the_unfused_error(cache, q)
    assert_fused_within_twice_the_unfused_error(cache, q, extra=chunk(101))


def test_policy_window_and_gqa():
    cache = filled(qkv.build_policy("kivi"), chunks=9, span_chunks=2)
    layer = cache.layer(0)
    assert layer.spans and sum(c.tokens for c in layer.tail) >= 128  # KIVI's full-precision window
    q = torch.randn(1, 4, 16, 64, generator=torch.Generator().manual_seed(7)).bfloat16().to(DEVICE)  # 4 heads on 2
    assert_fused_within_twice_the_unfused_error(cache, q)


def test_an_empty_layer_attends_to_extra_only():
    cache = qkv.KVCache("rtn")
    q, extra = chunk(3, n=8)[0], chunk(4)
    *fused_outputs, plain = attend_all(cache, q, extra)
    ref = F.scaled_dot_product_attention(q.float(), extra[0].float(), extra[1].float())
    assert all((out.float() - ref).abs().max() <= 2 * (plain.float() - ref).abs().max() for out in fused_outputs)
    with pytest.raises(CacheError, match="holds nothing"):
        cache.attend(0, q)


def test_the_flag_is_a_checked_option_that_survives_save_and_load(tmp_path):
    with pytest.raises(ConfigError, match="fused_attention"):
        qkv.KVCache("rtn", fused_attention="yes")
    cache = filled("rtn", chunks=3, span_chunks=2, fused_attention=False)
    cache.save(tmp_path)
    assert qkv.KVCache.load(tmp_path).config.fused_attention is False
