"""transformers models with sliding-window layers and ``QKVCache(..., config=model.config)``.

Tiny random-weight models (the mechanics, not the quality): a Mistral whose every layer slides
over 8 tokens, a Qwen2 with one sliding and one full-attention layer, a Llama 4 with one chunked
(kept alike by transformers' cache) and one full layer. Each sliding layer keeps what transformers'
``DynamicSlidingWindowLayer`` keeps: on a lossless policy the greedy output and the stored bytes
equal transformers' default cache, and the lengths it reports for masks are the same.
"""

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import qkv  # noqa: E402
from qkv.caches.adapters.transformers_cache import ATTENTION, QKVCache, QKVSlidingLayer  # noqa: E402
from qkv.caches.layer_cache import LayerCache  # noqa: E402
from qkv.errors import CacheError  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("error:.*past_key_values. is deprecated:FutureWarning"),
]

WINDOW = 8
SIZES = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def build(name):
    from transformers import (
        Llama4ForCausalLM,
        Llama4TextConfig,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if name == "mistral":
        config, cls = MistralConfig(**SIZES, sliding_window=WINDOW), MistralForCausalLM
    elif name == "qwen2":
        config = Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=WINDOW,
                             layer_types=["sliding_attention", "full_attention"])
        cls = Qwen2ForCausalLM
    else:
        config = Llama4TextConfig(**SIZES, intermediate_size_mlp=256, head_dim=32, attention_chunk_size=WINDOW,
                                  num_local_experts=1, moe_layers=[], no_rope_layers=[1, 0],
                                  layer_types=["chunked_attention", "full_attention"])
        cls = Llama4ForCausalLM
    return cls(config).eval(), cls(config).eval()


@pytest.fixture(scope="module", params=["mistral", "qwen2", "llama4"])
def model(request):
    return build(request.param)


@pytest.fixture(scope="module")
def mistral():
    return build("mistral")


PROMPT = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def generate(model, attention, cache, **kwargs):
    model.set_attn_implementation(attention)
    with torch.no_grad():
        return model.generate(PROMPT, max_new_tokens=40, min_new_tokens=40, do_sample=False, cache=cache, **kwargs)


def reference(model):
    """transformers' own cache (DynamicCache(config=...), made by generate) and its output."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=40, min_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    return out.sequences, out.cache


@pytest.fixture
def direct_attends(monkeypatch):
    """Counts the calls of LayerCache.attend (the direct path)."""
    calls = []
    attend = LayerCache.attend

    def counted(self, *args, **kwargs):
        calls.append(self.index)
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(LayerCache, "attend", counted)
    return calls


@pytest.mark.parametrize("direct", [False, True], ids=["read", "direct"])
def test_lossless_output_and_stored_bytes_equal_the_default_cache(model, direct, direct_attends):
    model, _ = model
    expected, default = reference(model)
    cache = QKVCache("fp32", config=model.config, span_tokens=4, direct=direct)
    out = generate(model, ATTENTION if direct else "sdpa", cache)
    assert torch.equal(out, expected)
    assert cache.is_sliding == default.is_sliding and True in cache.is_sliding
    for ours, theirs in zip(cache.layers, default.layers):
        assert ours.layer.tokens == theirs.keys.shape[2]  # sliding: the newest 7 tokens; full: all 55
        assert ours.layer.spans or ours.is_sliding  # the full layer compressed its history
    mem = cache.memory()
    assert mem.total == sum(2 * layer.keys.numel() * 4 for layer in default.layers) and mem.dead_tokens == 0
    # every one-token step attended to the compressed layer directly, sliding layers too; a
    # chunked layer's step whose chunk does not hold all the retained tokens has a mask that hides
    # some, so it reads the layer back for SDPA
    chunked = getattr(model.config, "attention_chunk_size", None) is not None
    assert direct_attends.count(1) == (39 if direct else 0)
    whole_chunk = sum(p % WINDOW == WINDOW - 1 for p in range(16, 55))  # steps whose chunk holds all 7
    assert direct_attends.count(0) == (0 if not direct else whole_chunk if chunked else 39)


def test_a_sliding_layer_holds_no_more_than_its_window(mistral):
    """Without the config every token stays (same output: the model's masks apply the window);
    with it the memory is bounded by the window, however long the generation."""
    model, _ = mistral
    unbounded = QKVCache("fp32", span_tokens=4)
    bounded = QKVCache("fp32", config=model.config, span_tokens=4)
    assert torch.equal(generate(model, "sdpa", unbounded), generate(model, "sdpa", bounded))
    assert [layer.tokens for layer in unbounded.kv.layers] == [55, 55]
    assert [layer.tokens for layer in bounded.kv.layers] == [WINDOW - 1] * 2
    assert unbounded.memory().total * (WINDOW - 1) == bounded.memory().total * 55


@pytest.mark.parametrize("policy", ["fp32", "rtn"])
def test_a_prompt_longer_than_the_window_does_not_keep_its_room(mistral, policy):
    """The tail buffer that took a 16-token prompt shrinks once the window has cut it, and
    decoding keeps it within 1.5 windows plus a chunk: what is allocated stays close to what is
    held (the bytes of transformers' default cache on a lossless policy)."""
    model, _ = mistral
    cache = QKVCache(policy, config=model.config)
    generate(model, "sdpa", cache)
    for layer in cache.kv.layers:
        assert layer.tokens == WINDOW - 1 and layer.window == WINDOW
        assert layer.buffer.capacity <= int(1.5 * WINDOW) + 1
    mem = cache.memory()
    per_token = 2 * 2 * 32 * 4  # K and V, 2 KV heads x 32, fp32
    assert mem.reserved <= len(cache.kv.layers) * (int(1.5 * WINDOW) + 1) * per_token


def test_a_direct_cache_without_the_config_warns_of_the_window(mistral):
    """qkv's attention sees the window transformers passes it: a direct cache made without the
    config (every token kept) says so; one made with it does not."""
    model, _ = mistral
    with pytest.warns(UserWarning, match="sliding window of 8 tokens.*config=model.config"):
        generate(model, ATTENTION, QKVCache("fp32", direct=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        generate(model, ATTENTION, QKVCache("fp32", config=model.config, direct=True))


def test_lengths_and_mask_sizes_follow_transformers_sliding_layer(mistral):
    """Step by step (a 5-token prompt, one-token steps, a 3-token step) the cache reports what
    DynamicCache(config) reports: sequence length, mask sizes, maximum length."""
    from transformers import DynamicCache

    model, _ = mistral
    model.set_attn_implementation("sdpa")
    ours, theirs = QKVCache("fp32", config=model.config, span_tokens=4), DynamicCache(config=model.config)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    steps, at = [5] + [1] * 9 + [3] + [1] * 4, 0
    with torch.no_grad():
        for n in steps:
            a = model(ids[:, at : at + n], cache=ours, use_cache=True).logits
            b = model(ids[:, at : at + n], cache=theirs, use_cache=True).logits
            at += n
            torch.testing.assert_close(a, b)
            for i in range(2):
                assert ours.get_seq_length(i) == theirs.get_seq_length(i) == at
                for q in (1, 3):
                    assert ours.get_mask_sizes(q, i) == theirs.get_mask_sizes(q, i)
                assert ours.get_max_length(i) == theirs.get_max_length(i) == WINDOW
                assert ours.layers[i].layer.tokens == theirs.layers[i].keys.shape[2]


@pytest.mark.parametrize(
    "policy, dead",
    [
        (qkv.build_policy("rtn", bits=4), 0),  # per-token codes: what the window drops is freed
        # KIVI, residual of 2: its 4-token spans of keys (per channel, 4 bits) fill no int32 word
        # alone, so a span the window cuts keeps its evicted keys until it leaves the window
        (qkv.build_policy("kivi", bits=4, block=4, window=2), 3),
    ],
    ids=["rtn", "kivi"],
)
def test_lossy_direct_equals_the_read_path_and_spans_cut_by_the_window(mistral, policy, dead, direct_attends):
    model, _ = mistral
    direct = QKVCache(policy, config=model.config, span_tokens=4, direct=True)
    out = generate(model, ATTENTION, direct)
    assert len(direct_attends) == 2 * 39
    read = QKVCache(policy, config=model.config, span_tokens=4)
    assert torch.equal(out, generate(model, "sdpa", read))
    for layer in direct.kv.layers:
        assert layer.tokens == WINDOW - 1 and layer.spans  # compressed, bounded by the window
        assert layer.memory().dead_tokens <= dead
        assert all(sp.ckv.k.shape[2] - sp.skip == sp.tokens <= 4 for sp in layer.spans)


@pytest.mark.parametrize("direct", [False, True], ids=["read", "direct"])
def test_assisted_decoding_rolls_back_a_sliding_window(mistral, direct):
    """Assisted decoding records the past (activate_past_recording) and crops rejected candidates;
    the window is restored after each crop."""
    model, assistant = mistral
    expected, _ = reference(model)
    cache = QKVCache("fp32", config=model.config, span_tokens=4, recent_chunks=1, direct=direct)
    out = generate(model, ATTENTION if direct else "sdpa", cache, assistant_model=assistant)
    assert torch.equal(out, expected)
    assert all(layer.record_past for layer in cache.layers)
    assert [layer.tokens for layer in cache.kv.layers] == [WINDOW - 1] * 2


def test_what_a_sliding_cache_cannot_do_raises(mistral):
    from transformers import LlamaConfig

    model, _ = mistral
    with pytest.raises(CacheError, match="sink_chunks=1"):
        QKVCache("fp32", config=model.config, sink_chunks=1)
    hybrid = LlamaConfig(**SIZES, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(CacheError, match="'linear_attention'; supported layer types: full_attention"):
        QKVCache("fp32", config=hybrid)
    cache = QKVCache("fp32", config=model.config, span_tokens=4)
    generate(model, "sdpa", cache)
    layer = cache.layers[0]
    assert isinstance(layer, QKVSlidingLayer) and layer.layer.evicted
    with pytest.raises(CacheError, match="already evicted"):  # the window would need evicted tokens
        cache.crop(-2)
    assert layer.layer.tokens == WINDOW - 1 and layer.get_seq_length() == 55  # unchanged
    cache.crop(0)  # nothing to drop: fine
