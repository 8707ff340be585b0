"""One evaluation run: load each dataset, run the suite on the selected layers and heads, save
every row as it finishes (resuming from saved rows), then draw the frontier."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from qkv.evaluation.memory import keep_freed_memory
from qkv.evaluation.plot import plot_frontier
from qkv.evaluation.report import environment, format_duration
from qkv.evaluation.results import ResultsFile
from qkv.evaluation.runner import Result, evaluate
from qkv.evaluation.selection import FULL, QUICK, Selection
from qkv.evaluation.suite import build_suite
from qkv.realdata import load_dataset

DTYPE = torch.bfloat16


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``qkv eval`` runs (validated by the CLI)."""

    datasets: tuple[str, ...]
    selection: Selection
    device: torch.device
    out: Path
    policies: tuple[str, ...] | None = None  # presets; None: all
    matched: bool = True
    sweep: bool = True
    ablation: bool = True
    restart: bool = False  # ignore rows saved by an earlier run
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class EvalRun:
    """What a run produced: the rows and dataset labels, and where the time went."""

    results: list[Result]
    labels: dict[str, str]
    phases: dict[str, float]  # seconds: load, evaluate, plot
    reused: int  # rows taken from an earlier run's eval.json
    process: dict[str, float]  # user_s, sys_s, peak_rss_gb, minor_faults (this process)


def _process() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user_s": round(usage.ru_utime, 1),
        "sys_s": round(usage.ru_stime, 1),
        "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # KiB on Linux
        "minor_faults": usage.ru_minflt,
    }


def _first(n: int | None, what: str) -> str:
    return f"every {what}" if n is None else f"the first {what}" if n == 1 else f"the first {n} {what}s"


def describe(selection: Selection) -> str:
    """The selection in words, for the plot and the summary."""
    if selection == FULL:
        return "full run: every layer and head"
    kind = "quick run" if selection == QUICK else "subset"
    return f"{kind}: {_first(selection.layers, 'layer')} and {_first(selection.heads, 'head')} of each dataset"


def run_eval(config: EvalConfig, log=print) -> EvalRun:
    """Run ``config``; ``log`` gets one line per phase. Every dataset is loaded (built on first
    use) before any policy runs, so a failing build stops the run before it spends time. Rows are
    saved to ``config.out`` as they finish, so an interrupted run keeps them; running the same
    config again resumes.

    Once the data is loaded, calls :func:`~qkv.evaluation.memory.keep_freed_memory`: for the rest
    of the process, glibc keeps freed memory instead of returning it to the system."""
    run = {
        "selection": dataclasses.asdict(config.selection),
        "device": config.device.type,
        "dtype": str(DTYPE).removeprefix("torch."),
        "description": describe(config.selection),
    }
    store = ResultsFile(config.out, run, environment(config.device), restart=config.restart)
    if store.ignored:
        log(store.ignored)
    elif store.resumable:
        log(f"resuming: {store.resumable} rows saved in {store.json_path} are reused")
    t0 = time.perf_counter()
    data = {}
    for dataset in config.datasets:
        log(f"{dataset}: loading (built offline and cached on first use)")
        everything = load_dataset(dataset, progress=config.progress)
        data[dataset] = [  # copies: the unselected layers and heads are freed
            dataclasses.replace(s, k=s.k.to(config.device, DTYPE, copy=True), v=s.v.to(config.device, DTYPE, copy=True))
            for s in config.selection.apply(everything)
        ]
        store.set_label(dataset, f"{everything[0].label.split(' L')[0]}; {config.selection.describe(everything)}")
        del everything
    keep_freed_memory()
    phases = {"load": time.perf_counter() - t0, "evaluate": 0.0, "plot": 0.0}
    reused = 0
    for dataset, samples in data.items():
        t1 = time.perf_counter()
        suite = build_suite(
            [tuple(s.k.shape) for s in samples], DTYPE, presets=list(config.policies) if config.policies else None,
            matched=config.matched, sweep=config.sweep, ablation=config.ablation,
        )
        bar = tqdm(suite, desc=dataset, unit="policy", disable=not config.progress, file=sys.stderr)
        for entry in bar:
            bar.set_postfix_str(entry.name)
            result = store.saved(dataset, entry.name, entry.policy.spec)
            if result is None:
                result = evaluate(entry.policy, entry.name, dataset, samples, device=config.device,
                                  family=entry.family, group=entry.group, dtype=DTYPE)
            else:
                reused += 1
            store.add(result)
        phases["evaluate"] += time.perf_counter() - t1
        log(f"{dataset}: {len(suite)} policies in {format_duration(time.perf_counter() - t1)}")
    t2 = time.perf_counter()
    plot_frontier(store.folder / "frontier.png", store.results, store.labels, run["description"])
    phases["plot"] = time.perf_counter() - t2
    process = _process()
    store.finish(
        phases_s={k: round(v, 1) for k, v in phases.items()}, computed_rows=len(store.results) - reused,
        reused_rows=reused, process=process,
    )
    return EvalRun(store.results, store.labels, phases, reused, process)
