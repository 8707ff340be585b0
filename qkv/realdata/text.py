"""Long real English prose available offline: the licence texts every Debian system ships.

``/usr/share/common-licenses`` (Debian ``base-files``) holds the verbatim GNU GPL-3 (5,600 words of
real, carefully written prose). Its notice allows verbatim copying, which is all we do.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["LICENCE_FILES", "licence_text", "sentences"]

# First one found wins; the dataset metadata records which was used.
LICENCE_FILES = (
    Path("/usr/share/common-licenses/GPL-3"),
    Path("/usr/share/common-licenses/GPL-2"),
    Path("/usr/share/common-licenses/LGPL-2.1"),
    Path("/usr/share/common-licenses/Apache-2.0"),
)

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+(?=[\"'(A-Z0-9])")


def licence_text() -> tuple[Path, str]:
    """``(path, text)`` of the first licence found, paragraphs joined by blank lines, whitespace
    inside each paragraph collapsed (the files are hard-wrapped at ~72 columns)."""
    for path in LICENCE_FILES:
        if path.is_file():
            raw = path.read_text(encoding="utf-8")
            paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
            return path, "\n\n".join(p for p in paras if p)
    names = ", ".join(str(p) for p in LICENCE_FILES)
    raise FileNotFoundError(f"no licence text found (looked for {names}); on Debian they come with base-files")


def sentences(text: str) -> list[str]:
    """Split prose into sentences (also at ``;`` and ``:``), keeping paragraph boundaries.

    Headings and other short paragraphs stay single "sentences"."""
    out: list[str] = []
    for para in text.split("\n\n"):
        out.extend(s for s in _SENTENCE_END.split(para) if s.strip())
    return out
