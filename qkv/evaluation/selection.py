"""Which part of each real dataset ``qkv eval`` runs on: the quick default, or everything."""

from __future__ import annotations

import dataclasses

from qkv.realdata import KVSample


@dataclasses.dataclass(frozen=True)
class Selection:
    """The first ``layers`` layers of a dataset and the first ``heads`` heads of each (None: all).

    Heads, not tokens, are cut: every span keeps its full length, so every row's bits per element
    are exactly those of the full run (a codebook's cost depends on the span length), and since
    heads are compressed independently (:func:`qkv.evaluation.evaluate`), each kept head's result
    is exactly its result in the full run.
    """

    layers: int | None = None
    heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"selection: {name} must be an integer >= 1 or None, got {value!r}")

    def apply(self, samples: list[KVSample]) -> list[KVSample]:
        """The selected layers of ``samples`` with K and V [1, H, S, D] cut to the selected heads."""
        return [
            dataclasses.replace(s, k=s.k[:, : self.heads], v=s.v[:, : self.heads])
            for s in samples[: self.layers]
        ]

    def describe(self, samples: list[KVSample]) -> str:
        """What the selection keeps of ``samples``, e.g. ``1 of 2 layers, 2 of 12 heads, 37,440 tokens, D = 128``."""
        _, h, s, d = samples[0].k.shape
        kept = self.apply(samples)
        layers = f"{len(kept)} of {len(samples)} layers" if len(kept) < len(samples) else f"{len(samples)} layers"
        k = kept[0].k.shape[1]
        heads = f"{k} of {h} heads" if k < h else f"{h} heads"
        return f"{layers}, {heads}, {s:,} tokens, D = {d}"


QUICK = Selection(layers=1, heads=2)
FULL = Selection()
