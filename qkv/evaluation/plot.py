"""The quality-memory frontier: SNR against true bits per element, a column per dataset."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from qkv.evaluation.runner import Result

BITS_SHOWN = (2.0, 5.0)  # where the policies compete; points beyond sit on the right edge
MARKERS = {  # group -> (marker, legend text)
    "preset": ("o", "preset"),
    "matched": ("s", "fitted to RTN's bits"),
    "sweep": ("^", "bit-width sweep"),
    "ablation": ("X", "qvg-ref -> qvg step"),
}
OFF_SCALE = ">"


def _title(label: str) -> str:
    """A dataset label ``"<model>; <shape>"`` as a wrapped two-part panel title."""
    parts = [textwrap.fill(p, 50) for p in label.split("; ")]
    return "\n".join(parts)


def _label_edge(ax, points: list[tuple[float, float, tuple]]) -> None:
    """Write each off-scale point's bits left of its edge marker, labels at least 5% of the
    axis height apart (points close in SNR would print on top of each other)."""
    bottom, top = ax.get_ylim()
    right = ax.get_xlim()[1]
    gap, last = 0.05 * (top - bottom), -math.inf
    for y, bits, colour in sorted(points):
        last = max(y, last + gap)
        ax.annotate(f"{bits:.1f}", (right, last), xytext=(-7, 0), textcoords="offset points",
                    ha="right", va="center", fontsize=8, color=colour)


def plot_frontier(path: str | Path, results: list[Result], labels: dict[str, str], subtitle: str = "") -> None:
    """Write :func:`frontier_figure` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = frontier_figure(results, labels, subtitle)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_figure(results: list[Result], labels: dict[str, str], subtitle: str = ""):
    """SNR vs bits per element: keys on top, values below, one column per dataset titled with
    its label; a curve per family (bf16 left out); the legend outside the panels. Points above
    ``BITS_SHOWN`` are drawn on the right edge as ``>`` with their bits written next to them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    datasets = list(dict.fromkeys(r.dataset for r in results))
    families = sorted({r.family for r in results if r.family != "bf16"})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    lo, hi = BITS_SHOWN
    fig, axes = plt.subplots(
        2, len(datasets), figsize=(3.9 * len(datasets) + 2.4, 7.6), squeeze=False, layout="constrained"
    )
    for col, dataset in enumerate(datasets):
        rows = [r for r in results if r.dataset == dataset and r.family != "bf16"]
        for row, (tensor, key) in enumerate((("K", "snr_k_db"), ("V", "snr_v_db"))):
            ax = axes[row][col]
            off_scale = []  # (snr, bits, colour) of the points drawn on the right edge
            for family in families:
                pts = sorted((r.bits, getattr(r, key), r.group) for r in rows if r.family == family)
                pts = [p for p in pts if math.isfinite(p[1])]
                shown = [p for p in pts if p[0] <= hi]
                ax.plot([p[0] for p in shown], [p[1] for p in shown], "-", color=colours[family], alpha=0.5)
                for x, y, group in shown:
                    ax.plot(x, y, MARKERS[group][0], color=colours[family], ms=6)
                for x, y, _ in (p for p in pts if p[0] > hi):
                    ax.plot(hi, y, OFF_SCALE, color=colours[family], ms=8, clip_on=False)
                    off_scale.append((y, x, colours[family]))
            ax.set_xlim(lo, hi)
            _label_edge(ax, off_scale)
            ax.set_xlabel("bits per element (everything stored)", fontsize=9)
            ax.set_ylabel(f"{tensor} SNR (dB)", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(_title(labels.get(dataset, dataset)), fontsize=9.5)
    handles = [Line2D([], [], color=colours[f], marker="o", label=f) for f in families]
    handles += [Line2D([], [], color="0.35", marker=m, ls="none", label=text) for m, text in MARKERS.values()]
    handles.append(Line2D([], [], color="0.35", marker=OFF_SCALE, ls="none", ms=8,
                          label=f"above {hi:g} bits\n(bits written beside)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
    title = "qkv: quality vs memory on real K/V (higher and further left is better)"
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=12)
    return fig
