"""Where one-query decoding's time goes: Nsight Compute's counters for the decode kernel.

At the Llama-3-8B attention shapes of ``bench_decode.py`` (one query, history in spans of 4,096
tokens), ``KVCache.attend`` over a cache of each policy runs in a child process under ``ncu``
(the CUDA toolkit's, on the PATH), which profiles one ``decode_kernel`` launch after the warm-up
calls: its duration, compute and memory throughput against the peaks, the L1 and L2 hit rates
and bytes, achieved occupancy and the warp stall reasons (cycles per issued instruction). The
counters of each (policy, batch, history) are written as given by ``ncu --csv --page raw``.

    python benchmarks/decode_ncu.py --out benchmarks/results/decode_ncu_h100.json
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import torch

from common import gpu_main_args, write_json

CASES = ((1, 32 * 1024), (1, 128 * 1024))
POLICIES = ("qvg", "rtn", "kivi", "bf16")
WARM_UP = 3  # attend calls before the profiled one: the kernel's compilation and the plan's tables
METRICS = (
    "gpu__time_duration.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes_read.sum",
    "lts__t_bytes.sum",
    "lts__t_sector_hit_rate.pct",
    "l1tex__t_bytes.sum",
    "l1tex__t_sector_hit_rate.pct",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_no_instruction_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_imc_miss_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_tex_throttle_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_membar_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_drain_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_branch_resolving_per_issue_active.ratio",
)


def child(policy: str, batch: int, tokens: int) -> None:
    """The calls ncu watches: WARM_UP + 1 one-query attends over a fresh cache."""
    from bench_decode import HEAD_DIM, HEADS, build, history

    k, v = history(batch, tokens)
    cache = build(policy, k, v)
    q = (torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda") * 0.5).bfloat16()
    for _ in range(WARM_UP + 1):
        cache.attend(0, q)
    torch.cuda.synchronize()


def profiled(policy: str, batch: int, tokens: int) -> dict:
    """ncu's METRICS of the last decode_kernel launch of ``child``."""
    cmd = ["ncu", "--csv", "--page", "raw", "--kernel-name", "regex:decode_kernel", "--launch-skip", str(WARM_UP),
           "--launch-count", "1", "--metrics", ",".join(METRICS),
           sys.executable, __file__, "--child", policy, str(batch), str(tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith('"')]
    if done.returncode or len(lines) < 3:
        raise SystemExit(f"ncu failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    header, units, values = list(csv.reader(io.StringIO("\n".join(lines[:1] + lines[1:2] + lines[-1:]))))
    return {name: {"value": value, "unit": unit} for name, unit, value in zip(header, units, values)
            if name in METRICS or name == "Kernel Name"}


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    args = gpu_main_args(__doc__, "decode_ncu.py")
    rows = []
    for batch, tokens in CASES:
        for policy in POLICIES:
            row = {"policy": policy, "batch": batch, "history": tokens, "queries": 1,
                   "counters": profiled(policy, batch, tokens)}
            print(json.dumps({"policy": policy, "batch": batch, "history": tokens,
                              **{k.split("__")[-1][:60]: v["value"] for k, v in row["counters"].items()}}), flush=True)
            rows.append(row)
    write_json(args.out, {"warm_up_calls": WARM_UP, "rows": rows})


if __name__ == "__main__":
    main()
