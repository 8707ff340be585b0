"""transformers models attending to the compressed spans directly (attn_implementation="qkv").

A tiny Llama with random weights (the mechanics, not the quality): greedy output with
``QKVCache(direct=True)`` equals the decompress-then-SDPA path (``direct=False``) and, on a lossless
policy, transformers' own cache; assisted decoding crops rejected candidates from the tail.
"""

import pytest
import torch

pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.caches.adapters.transformers_cache import ATTENTION, QKVCache  # noqa: E402
from qkv.errors import CacheError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval(), torch.randint(0, 256, (1, 16))


def generate(model, prompt, attention, cache, **kwargs):
    model.set_attn_implementation(attention)
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=40, do_sample=False, cache=cache, **kwargs)


@pytest.mark.parametrize("name", ["fp32", "rtn", "kivi"])
def test_direct_attention_equals_decompress_then_sdpa(llama, name):
    model, _, prompt = llama
    options = {"fp32": {}, "rtn": {"bits": 4}, "kivi": {"bits": 4, "block": 16, "window": 4}}[name]
    policy = qkv.build_policy(name, **options)
    direct = QKVCache(policy, span_tokens=16, direct=True)
    out = generate(model, prompt, ATTENTION, direct)
    assert all(layer.spans for layer in direct.kv.layers)  # the history really was compressed
    assert torch.equal(out, generate(model, prompt, "sdpa", QKVCache(policy, span_tokens=16)))
    if name == "fp32":
        assert torch.equal(out, generate(model, prompt, "sdpa", None))


@pytest.mark.parametrize("name", qkv.list_policies())
def test_every_preset_runs_on_a_head_dim_of_32(llama, name):
    """The tiny Llama's heads are 32 wide: presets whose blocks are 64 quantize in blocks of 32."""
    model, _, prompt = llama
    cache = QKVCache(name, span_tokens=16, direct=True)
    out = generate(model, prompt, ATTENTION, cache, min_new_tokens=40)
    assert out.shape == (1, 56) and cache.kv.layer(0).layout.head_dim == 32
    assert all(layer.spans for layer in cache.kv.layers) or cache.kv.config.fp_window > 56  # kivi's 128


def test_kivi_keeps_its_residual_window_while_generating(llama):
    """KIVI's preset with the cache's default options: the newest 128 tokens stay in full
    precision, every whole group of 32 older tokens is quantized (keys per channel)."""
    model, _, _ = llama
    prompt = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(1))
    cache = QKVCache("kivi", direct=True)
    generate(model, prompt, ATTENTION, cache, min_new_tokens=40)
    for layer in cache.kv.layers:
        assert sum(sp.tokens for sp in layer.spans) == (layer.seen - 128) // 32 * 32 == 32
        assert all(sp.ckv.k.quantized_tokens == sp.tokens for sp in layer.spans)


def test_assisted_decoding_crops_the_tail(llama):
    model, assistant, prompt = llama
    reference = generate(model, prompt, "sdpa", None)
    cache = QKVCache("fp32", span_tokens=16, recent_chunks=1, direct=True)
    assert torch.equal(generate(model, prompt, ATTENTION, cache, assistant_model=assistant), reference)
    layer = cache.kv.layer(0)
    with pytest.raises(CacheError, match="never rolled back"):
        layer.drop_newest(sum(c.tokens for c in layer.tail) + 1)


def test_direct_needs_the_qkv_attention(llama):
    model, _, prompt = llama
    with pytest.raises(CacheError, match="set_attn_implementation"):
        generate(model, prompt, "sdpa", QKVCache("fp32", span_tokens=16, direct=True))


@pytest.mark.parametrize("name", ["rtn", "kivi"])
def test_replayed_attention_generates_what_the_eager_path_does(llama, name):
    """``attend_graphs=True``: each layer's one-token attention replayed from its graph (emulated
    off a GPU: see tests/caches/test_attend_graphs.py) while only the tail grows; the greedy
    output equals the eager direct path's, with graphs captured and replayed."""
    from qkv.caches.attend_graphs import AttendGraph
    from test_attend_graphs import emulated_capture

    model, _, prompt = llama
    options = {"rtn": {"bits": 4}, "kivi": {"bits": 4, "block": 16, "window": 4}}[name]
    policy = qkv.build_policy(name, **options)
    graphed = QKVCache(policy, span_tokens=16, direct=True, attend_graphs=True, num_layers=2)
    graphs = [AttendGraph(emulated_capture, devices=("cpu",)) for _ in graphed.kv.layers]
    for layer, graph in zip(graphed.kv.layers, graphs):
        layer.attend_graph = graph
    out = generate(model, prompt, ATTENTION, graphed, min_new_tokens=40)  # 40 steps, past the model's EOS
    assert torch.equal(out, generate(model, prompt, ATTENTION, QKVCache(policy, span_tokens=16, direct=True),
                                     min_new_tokens=40))
    assert all(g.captures and g._live is not None for g in graphs)
