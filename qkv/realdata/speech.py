"""Real speech without internet: decode recordings with PyAV, synthesize English with espeak-ng.

- ``load_speech(path_or_wav_bytes)`` -> float32 mono numpy at 16 kHz (Whisper's rate).
- ``speak(text)`` -> WAV bytes spoken by the Debian ``espeak-ng`` binary.
- ``speak_sentences(sentences, min_seconds)`` -> one long 16 kHz signal plus where each sentence lies.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SAMPLE_RATE", "LongSpeech", "espeak_version", "load_speech", "speak", "speak_sentences"]

SAMPLE_RATE = 16_000
VOICE = "en-us"
WORDS_PER_MINUTE = 175  # espeak-ng's default rate


def load_speech(source: str | os.PathLike | bytes, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any audio file (or in-memory WAV bytes) to float32 mono at ``sample_rate`` Hz.

    Returns a 1-D array in [-1, 1]. Decoding and resampling use PyAV (FFmpeg's libswresample).
    """
    import av

    src = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    chunks: list[np.ndarray] = []
    with av.open(src) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(audio=0):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng not found; install the Debian package: apt-get install -y espeak-ng")
    return exe


def espeak_version() -> str:
    """espeak-ng's version line (recorded with the datasets: another version speaks slightly differently)."""
    return subprocess.run([_espeak(), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def speak(text: str, *, voice: str = VOICE, words_per_minute: int = WORDS_PER_MINUTE) -> bytes:
    """Speak ``text`` with espeak-ng; returns a 16-bit mono WAV (22,050 Hz) as bytes.

    Deterministic for a given espeak-ng version. Use ``load_speech(speak(text))`` for 16 kHz float32.
    """
    proc = subprocess.run(
        [_espeak(), "-v", voice, "-s", str(words_per_minute), "--stdout"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=True,
    )
    return proc.stdout


@dataclass(frozen=True)
class LongSpeech:
    """A long synthesized recording: ``audio`` (float32, 16 kHz) and, per sentence spoken,
    its text and sample span ``[start, end)`` in ``audio``."""

    audio: np.ndarray
    sentences: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def words_in(self, start: int, end: int) -> list[str]:
        """Words spoken (approximately) inside samples ``[start, end)``.

        Sentence boundaries are exact; inside a sentence a word's time is interpolated from its
        character offset, and a word belongs to the window holding its midpoint.
        """
        words: list[str] = []
        for text, (s0, s1) in zip(self.sentences, self.spans):
            if s1 <= start or s0 >= end:
                continue
            n_chars = max(len(text), 1)
            pos = 0
            for word in text.split():
                at = text.index(word, pos)
                pos = at + len(word)
                mid = s0 + (s1 - s0) * (at + pos) / (2 * n_chars)
                if start <= mid < end:
                    words.append(word)
        return words


def speak_sentences(sentences: Sequence[str], min_seconds: float, *, progress: bool = False) -> LongSpeech:
    """Speak sentences one by one (in order) until at least ``min_seconds`` of audio exist.

    Each sentence is a separate espeak-ng call, so its place in the concatenated audio is exact.
    Raises ``ValueError`` if all sentences together are shorter than ``min_seconds``.
    """
    from tqdm.auto import tqdm

    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    used: list[str] = []
    total = 0
    target = int(min_seconds * SAMPLE_RATE)
    bar = tqdm(total=round(min_seconds), unit="s", desc="espeak-ng", disable=not progress)
    for sentence in sentences:
        if total >= target:
            break
        audio = load_speech(speak(sentence))
        pieces.append(audio)
        spans.append((total, total + len(audio)))
        used.append(sentence)
        bar.update(min(total + len(audio), target) // SAMPLE_RATE - min(total, target) // SAMPLE_RATE)
        total += len(audio)
    bar.close()
    if total < target:
        raise ValueError(f"text too short: {total / SAMPLE_RATE:.0f} s of speech < {min_seconds:.0f} s")
    return LongSpeech(np.concatenate(pieces), tuple(used), tuple(spans))
