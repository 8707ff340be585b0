"""The evaluation's tables: text for the terminal, Markdown for eval.md, times in human units."""

from __future__ import annotations

import platform

import torch

from qkv.evaluation.runner import Result


def format_duration(seconds: float) -> str:
    """``0.43`` -> ``430 ms``, ``4.3`` -> ``4.3 s``, ``430.4`` -> ``7 min 10 s``, ``4290`` -> ``1 h 11 min``."""
    if seconds < 1:
        return f"{1000 * seconds:.0f} ms" if seconds >= 0.0095 else f"{1000 * seconds:.1f} ms"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


# title, width, format of the value (a format spec, or a function for times in ms)
COLUMNS = (
    ("policy", 26, "<26", "policy"),
    ("group", 8, "<8", "group"),
    ("bits/el", 7, ">7.3f", "bits"),
    ("x bf16", 6, ">6.2f", "ratio_vs_bf16"),
    ("K relMSE", 9, ">9.5f", "rel_mse_k"),
    ("K SNR dB", 8, ">8.2f", "snr_k_db"),
    ("V relMSE", 9, ">9.5f", "rel_mse_v"),
    ("V SNR dB", 8, ">8.2f", "snr_v_db"),
    ("encode", 10, "time", "encode_ms"),
    ("decode", 10, "time", "decode_ms"),
)


def _cell(result: Result, fmt: str, key: str, width: int | None) -> str:
    value = getattr(result, key)
    if fmt == "time":
        text = format_duration(value / 1000)
        return text if width is None else text.rjust(width)
    return format(value, fmt if width is not None else fmt.lstrip("<>0123456789"))


def format_table(results: list[Result], labels: dict[str, str]) -> str:
    """One block per dataset: a line with its label, a header, then a row per policy."""
    header = " ".join(t.ljust(w) if i < 2 else t.rjust(w) for i, (t, w, _, _) in enumerate(COLUMNS))
    lines = []
    for dataset in dict.fromkeys(r.dataset for r in results):
        lines += [f"\n== {dataset}: {labels.get(dataset, '')}", header]
        for r in results:
            if r.dataset == dataset:
                lines.append(" ".join(_cell(r, fmt, key, w) for _, w, fmt, key in COLUMNS))
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
                # a name such as qvg+kmeans|| keeps its pipes inside the cell
                lines.append("| " + " | ".join(_cell(r, fmt, key, None).replace("|", "\\|")
                                               for _, _, fmt, key in COLUMNS) + " |")
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
