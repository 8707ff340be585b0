"""The evaluation's outputs: a text table, a JSON file and the quality-memory frontier (PNG)."""

from __future__ import annotations

import json
import math
import os
import platform

import torch

from qkv.evaluation.runner import Result

# title, width, format, Result field
COLUMNS = (
    ("policy", 26, "<26", "policy"),
    ("group", 7, "<7", "group"),
    ("bits/el", 7, ">7.3f", "bits"),
    ("x bf16", 6, ">6.2f", "ratio_vs_bf16"),
    ("K relMSE", 9, ">9.5f", "rel_mse_k"),
    ("K SNR dB", 8, ">8.2f", "snr_k_db"),
    ("V relMSE", 9, ">9.5f", "rel_mse_v"),
    ("V SNR dB", 8, ">8.2f", "snr_v_db"),
    ("enc ms", 9, ">9.1f", "encode_ms"),
    ("dec ms", 8, ">8.1f", "decode_ms"),
)


def format_table(results: list[Result], labels: dict[str, str]) -> str:
    """One block per dataset: a line with its label, a header, then a row per policy."""
    header = " ".join(t.ljust(w) if i < 2 else t.rjust(w) for i, (t, w, _, _) in enumerate(COLUMNS))
    lines = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        lines += [f"\n== {dataset}: {labels.get(dataset, '')}", header]
        for r in results:
            if r.dataset == dataset:
                lines.append(" ".join(format(getattr(r, key), fmt) for _, _, fmt, key in COLUMNS))
    return "\n".join(lines)


def format_markdown(results: list[Result], labels: dict[str, str]) -> str:
    """The same table as :func:`format_table`, one Markdown table per dataset."""
    lines = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        lines += [f"\n### {dataset}\n", f"{labels.get(dataset, '')}\n"]
        lines.append("| " + " | ".join(t for t, _, _, _ in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in results:
            if r.dataset == dataset:
                cells = [format(getattr(r, key), fmt.lstrip("<>0123456789")) for _, _, fmt, key in COLUMNS]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device) -> dict[str, str]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write_json(path: str, results: list[Result], labels: dict[str, str], env: dict[str, str]) -> None:
    def clean(value):
        return None if isinstance(value, float) and math.isinf(value) else value

    payload = {
        "environment": env,
        "datasets": labels,
        "results": [{k: clean(v) for k, v in vars(r).items()} for r in results],
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def plot_frontier(path: str, results: list[Result], labels: dict[str, str]) -> None:
    """SNR vs bits per element, one column per dataset, keys on top, values below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in results))
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.6 * len(datasets), 7.5), squeeze=False)
    families = sorted({r.family for r in results if r.family != "bf16"})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    markers = {"preset": "o", "matched": "s", "sweep": "^", "ablation": "x"}
    for col, dataset in enumerate(datasets):
        rows = [r for r in results if r.dataset == dataset and r.family != "bf16"]
        for row, (tensor, key) in enumerate((("K", "snr_k_db"), ("V", "snr_v_db"))):
            ax = axes[row][col]
            for family in families:
                pts = sorted((r.bits, getattr(r, key), r.group) for r in rows if r.family == family)
                pts = [p for p in pts if math.isfinite(p[1])]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colours[family], alpha=0.5)
                for x, y, group in pts:
                    ax.plot(x, y, markers[group], color=colours[family])
                ax.plot([], [], "-o", color=colours[family], label=family)
            ax.set_xlabel("bits per element (true, all stored data)")
            ax.set_ylabel(f"{tensor} SNR (dB)")
            ax.set_title(f"{dataset} - {tensor}", fontsize=10)
            ax.grid(alpha=0.3)
        axes[1][col].text(
            0.02, 0.02, labels.get(dataset, "")[:70], transform=axes[1][col].transAxes, fontsize=6
        )
    axes[0][0].legend(fontsize=8, title="o preset  s matched  ^ sweep  x ablation", title_fontsize=7)
    fig.suptitle("qkv: quality-memory frontier on real K/V (higher and further left is better)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
