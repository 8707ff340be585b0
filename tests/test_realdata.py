"""Tests for qkv.realdata: the Whisper conversion, the four cached K/V datasets, their real structure.

The first run builds every dataset into the default cache ($QKV_CACHE_DIR or ~/.cache/qkv/realdata;
about two minutes on two CPU cores); later runs only read the files.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

import qkv.realdata as realdata
from qkv.realdata import KVSample, list_datasets, load_dataset

# name -> (layers, heads, head_dim, tokens per head; None where it depends on the tokenizer)
EXPECTED = {
    "whisper-encoder": (4, 6, 64, 30_000),
    "whisper-decoder": (4, 6, 64, None),
    "minilm": (6, 12, 32, 12 * 512),
    "wan": (2, 12, 128, 24 * 30 * 52),
}


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[KVSample]]:
    """Every dataset from the default cache (built there on first use)."""
    return {name: load_dataset(name, progress=False) for name in list_datasets()}


@pytest.mark.realdata
def test_whisper_conversion_transcribes_front_center():
    from qkv.realdata.whisper import load_speech, load_whisper_tiny_en, log_mel, transcribe

    model, feature_extractor, tokenizer = load_whisper_tiny_en()
    audio = load_speech("/usr/share/sounds/alsa/Front_Center.wav")
    assert audio.dtype.name == "float32" and audio.ndim == 1
    assert transcribe(model, feature_extractor, tokenizer, audio) == " Front, center."
    # transformers' own generate() (what a Cache adapter will drive) agrees
    ids = model.generate(log_mel(feature_extractor, audio))
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == " Front, center."


@pytest.mark.realdata
def test_list_datasets():
    assert list_datasets() == ["whisper-encoder", "whisper-decoder", "minilm", "wan"]


@pytest.mark.realdata
def test_unknown_dataset_raises_listing_names(tmp_path):
    with pytest.raises(ValueError) as err:
        load_dataset("llama", cache_dir=tmp_path)
    for name in list_datasets():
        assert name in str(err.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(EXPECTED))
def test_dataset_shapes_and_values(loaded, name):
    n_layers, heads, head_dim, tokens = EXPECTED[name]
    samples = loaded[name]
    assert [s.layer for s in samples] == list(range(n_layers))
    seq = samples[0].k.shape[2]
    if tokens is not None:
        assert seq == tokens
    for s in samples:
        assert s.source == name
        for t in (s.k, s.v):
            assert t.shape == (1, heads, seq, head_dim)
            assert t.dtype == torch.float32 and t.device.type == "cpu"
            assert torch.isfinite(t).all()
            assert t.abs().amax() > 0
        assert f"{seq:,} tokens" in s.label
        assert ("random weights" in s.label) == (name == "wan")


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(EXPECTED))
def test_second_load_is_bit_identical(loaded, name):
    again = load_dataset(name, progress=False)
    assert [s.label for s in again] == [s.label for s in loaded[name]]
    for a, b in zip(again, loaded[name]):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@pytest.mark.realdata
def test_build_then_cache_in_custom_dir(tmp_path, monkeypatch):
    from qkv.realdata import minilm, store

    first = load_dataset("minilm", cache_dir=tmp_path, progress=False)
    path = tmp_path / "minilm.safetensors"
    assert path.is_file() and store.read_info(path)["chunks"] == 12

    def no_rebuild(progress=True):
        raise AssertionError("the second call must read the cache, not rebuild")

    monkeypatch.setattr(minilm, "build", no_rebuild)
    second = load_dataset("minilm", cache_dir=tmp_path, progress=False)
    for a, b in zip(first, second):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        assert a.label == b.label
    # a stale file (different builder config) is rebuilt, not trusted
    monkeypatch.setattr(minilm, "CONFIG", {**minilm.CONFIG, "n_chunks": 99})
    with pytest.raises(AssertionError, match="must read the cache"):
        load_dataset("minilm", cache_dir=tmp_path, progress=False)


def test_processes_that_need_one_build_at_once_build_it_once(tmp_path, monkeypatch):
    """Two loads of a dataset not yet built, started together: one builds, the other waits for its
    file and reads it (each thread opens the lock file itself, as another process would)."""
    from qkv.realdata import minilm

    builds = []
    sample = KVSample("minilm", 0, torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), "fake")

    def slow_build(progress=True):
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        return {"minilm": [sample]}, {}

    monkeypatch.setattr(minilm, "build", slow_build)
    start = threading.Barrier(2)
    results = [None, None]

    def load(i):
        start.wait()
        results[i] = load_dataset("minilm", cache_dir=tmp_path, progress=False)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    for got in results:
        assert len(got) == 1 and torch.equal(got[0].k, sample.k) and torch.equal(got[0].v, sample.v)


def _neighbour_and_random_cos(k: torch.Tensor, n_pairs: int = 20_000) -> tuple[float, float]:
    """Mean cosine similarity of consecutive tokens and of random token pairs, over heads. k: [1, H, S, D]."""
    x = torch.nn.functional.normalize(k[0], dim=-1)
    seq = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, seq, (2, n_pairs), generator=gen)
    neighbour = (x[:, 1:] * x[:, :-1]).sum(-1).mean().item()
    random_pairs = (x[:, i] * x[:, j]).sum(-1).mean().item()
    return neighbour, random_pairs


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["whisper-encoder", "wan"])
def test_keys_have_token_redundancy(loaded, name):
    """Dense temporal/spatial signals give neighbouring keys far more similar than random pairs
    (Whisper encoder: 20 ms audio frames; Wan: latent patches in raster order). Shuffling the tokens
    destroys it, so this is a property of the data's order, not of the statistic."""
    gen = torch.Generator().manual_seed(1)
    for s in loaded[name]:
        neighbour, random_pairs = _neighbour_and_random_cos(s.k)
        assert neighbour > 0.6, (s.label, neighbour)
        assert neighbour - random_pairs > 0.4, (s.label, neighbour, random_pairs)
        perm = torch.randperm(s.k.shape[2], generator=gen)
        shuffled, _ = _neighbour_and_random_cos(s.k[:, :, perm])
        assert abs(shuffled - random_pairs) < 0.05, (s.label, shuffled, random_pairs)


@pytest.mark.realdata
def test_wan_processor_matches_diffusers():
    """The capturing processor computes what diffusers' WanAttnProcessor computes (full attention), and
    block-causal chunks equal a block-causal attention mask; K is captured before RoPE."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from qkv.realdata.wan import BlockCausalCaptureProcessor, build_model

    model = build_model(
        num_layers=2, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, text_dim=16, freq_dim=8
    )
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 3, 8, 8, generator=gen)  # 3 frames x 16 tokens
    text = torch.randn(1, 7, 16, generator=gen)
    t = torch.tensor([10])
    seq, chunk = 48, 16

    class MaskedProcessor(WanAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            block = torch.arange(seq) // chunk
            mask = block[None, :] <= block[:, None]
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)

    def run(make_processor):
        for i, block in enumerate(model.blocks):
            block.attn1.set_processor(make_processor(i))
        with torch.no_grad():
            return model(latents, t, text, return_dict=False)[0]

    sink: dict = {}
    reference = run(lambda i: WanAttnProcessor())
    full = run(lambda i: BlockCausalCaptureProcessor(sink, i, chunk_tokens=seq))
    torch.testing.assert_close(full, reference, rtol=1e-5, atol=1e-5)
    masked = run(lambda i: MaskedProcessor())
    causal = run(lambda i: BlockCausalCaptureProcessor(sink, i, chunk_tokens=chunk))
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal, full, atol=1e-3)

    # layer-0 K is norm_k(to_k(x)) with no rotation: recompute it from the block input
    attn = model.blocks[0].attn1
    captured = []
    handle = attn.norm_k.register_forward_hook(lambda m, a, out: captured.append(out))
    run(lambda i: BlockCausalCaptureProcessor(sink, i, chunk_tokens=chunk))
    handle.remove()
    expected = captured[0].reshape(1, seq, 2, 12).transpose(1, 2)
    torch.testing.assert_close(sink[0][0], expected, rtol=0, atol=0)


@pytest.mark.realdata
def test_import_is_cheap():
    code = (
        "import sys, qkv.realdata\n"
        "print(sorted(m for m in ('transformers', 'diffusers', 'av') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert realdata.__all__ == ["KVSample", "list_datasets", "load_dataset"]
