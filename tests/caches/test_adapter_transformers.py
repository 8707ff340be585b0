"""The transformers Cache adapter with a real model: Whisper tiny.en (real weights) on real speech.

Speech: the eight channel-test recordings of Debian's alsa-utils (a real human voice), one after
the other: " Front, center, front, left, ..., side, right." (about 30 decoded tokens).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkv

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.usefixtures("one_thread"),
    # transformers >= 5.24 takes the cache as `cache`; the old name warns until it is removed
    pytest.mark.filterwarnings("error:.*past_key_values. is deprecated:FutureWarning"),
]

NAMES = ["Front_Center", "Front_Left", "Front_Right", "Rear_Center", "Rear_Left", "Rear_Right", "Side_Left", "Side_Right"]
TEXT = " Front, center, front, left, front, right, rear, center, rear, left, rear, right, side, left, side, right."


@pytest.fixture(scope="module")
def whisper(one_thread):
    from qkv.realdata.whisper import load_speech, load_whisper_tiny_en, log_mel

    model, feature_extractor, tokenizer = load_whisper_tiny_en()
    audio = np.concatenate([load_speech(f"/usr/share/sounds/alsa/{n}.wav") for n in NAMES])
    features = log_mel(feature_extractor, audio)
    with torch.no_grad():
        reference = model.generate(features)  # transformers' own (uncompressed) cache
    assert tokenizer.decode(reference[0], skip_special_tokens=True) == TEXT
    return model, features, reference


@pytest.mark.parametrize(
    "policy, span_tokens",
    [
        (qkv.build_policy("qvg-int4", clusters=4, block=32), 16),
        (qkv.build_policy("kivi", bits=4, block=16, window=4), 16),  # keys per channel, groups of 16 tokens
        (qkv.build_policy("rtn", bits=4), 8),
        (qkv.build_policy("quarot", bits=4), 8),
    ],
    ids=["qvg-int4", "kivi-int4", "rtn-int4", "quarot-int4"],
)
def test_4bit_transcription_equals_the_uncompressed_cache(whisper, policy, span_tokens):
    from qkv.caches.adapters.transformers_cache import encoder_decoder_cache

    model, features, reference = whisper
    cache = encoder_decoder_cache(policy, span_tokens=span_tokens)
    with torch.no_grad():
        out = model.generate(features, cache=cache)
    assert torch.equal(out, reference)
    kv = cache.self_attention_cache.kv
    assert len(kv.layers) == 4 and all(layer.spans for layer in kv.layers)  # compression really happened
    mem = kv.memory()
    assert mem.compressed > 0 and mem.tokens == sum(layer.seen for layer in kv.layers) > 4 * 30


def test_lossless_policy_beam_search_equals_the_uncompressed_cache(whisper):
    """Beam search reorders batch rows of compressed spans (reorder_cache) without decompressing."""
    from qkv.caches.adapters.transformers_cache import encoder_decoder_cache

    model, features, _ = whisper
    with torch.no_grad():
        expected = model.generate(features, num_beams=3, max_new_tokens=20)
        cache = encoder_decoder_cache("fp32", span_tokens=4, sink_chunks=1)
        got = model.generate(features, num_beams=3, max_new_tokens=20, cache=cache)
    assert torch.equal(got, expected)
    assert cache.self_attention_cache.kv.layer(0).layout[0] == 3  # three beams


def test_positions_and_mask_sizes_stay_absolute_when_tokens_are_evicted(whisper):
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from qkv.caches.adapters.transformers_cache import QKVCache

    model, features, reference = whisper
    cache = QKVCache("fp32", span_tokens=4, sink_chunks=1, max_spans=2)
    pkv = EncoderDecoderCache(cache, DynamicCache())
    ids = reference[:, :20]
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        out = model(encoder_outputs=(encoded,), decoder_input_ids=ids[:, :2], cache=pkv, use_cache=True)
        for t in range(2, 20):
            out = model(encoder_outputs=(encoded,), decoder_input_ids=ids[:, t : t + 1], cache=pkv, use_cache=True)
    layer = cache.layers[0]
    # sink: the 2-token prompt; 18 steps -> 4 spans of 4 (2 retained) + 2 tail tokens
    assert cache.get_seq_length() == 20 and layer.layer.positions().tolist() == [0, 1, *range(10, 20)]
    assert layer.get_mask_sizes(1) == (12 + 1, 20 - 12)
    assert torch.isfinite(out.logits).all()
    cache.crop(-1)  # the newest token, from the full-precision tail
    assert cache.get_seq_length() == 19 and layer.layer.positions().tolist() == [0, 1, *range(10, 19)]
    with pytest.raises(qkv.errors.CacheError, match="never rolled back"):
        cache.crop(-2)  # one token is left in the tail


def test_the_installed_transformers_is_in_the_supported_range():
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    (spec,) = [Requirement(r) for r in project["optional-dependencies"]["eval"] if r.startswith("transformers")]
    assert version("transformers") in spec.specifier, (version("transformers"), str(spec))
