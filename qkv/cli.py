"""Command line: qkv eval (compare every policy on real K/V) and qkv list (presets, components)."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

EVAL_DESCRIPTION = """\
Compress real K/V (Whisper, MiniLM, a Wan DiT) with every preset policy, presets fitted to RTN's
bits, bit-width sweeps and the steps from the reference's choices to qvg; print a table and write
eval.json, eval.md and frontier.png to --out. Each row is saved as it finishes: after Ctrl-C or
a crash, the same command resumes where it stopped.

quick (default): the first layer and first 2 heads of each dataset, spans at full length (bits
  per element are exactly the full run's). {quick}
--full: every layer and head. {full}
First use builds the real K/V offline into ~/.cache/qkv/realdata ($QKV_CACHE_DIR): {build}
"""
# measured with /usr/bin/time on a 2-core x86-64 CPU shared with other jobs (docs/eval.md, "Cost")
QUICK_COST = "Measured: 33 s with one other job on a 2-core CPU (62 s CPU time), 1.1 GB of memory."
FULL_COST = "Measured: 30 min on a busy 2-core CPU, one thread (850 s CPU time), 1.7 GB of memory."
BUILD_COST = "1 min 20 s, 5.3 GB of memory, 1.4 GB on disk."


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps option help without breaking names such as whisper-encoder at their hyphen."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """Errors as one line naming the command, without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _names(kind: str, valid: list[str]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"no {kind} given; valid: {', '.join(valid)}")
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}"
            )
        return tuple(dict.fromkeys(names))

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _device(text: str):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: auto, cpu, cuda, cuda:<index>")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or not count:
            raise argparse.ArgumentTypeError(f"device {text!r} is not available here ({count} CUDA devices)")
    return device


def _writable_folder(path: Path) -> str | None:
    """None if ``path`` is (or can be made) a folder we can write to, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".qkv-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"cannot write to {str(path)!r}: {exc.strerror or exc}"
    return None


def cmd_eval(args: argparse.Namespace) -> int:
    from qkv.errors import QKVError
    from qkv.evaluation.report import format_duration, format_table
    from qkv.evaluation.run import EvalConfig, run_eval
    from qkv.evaluation.selection import FULL, QUICK, Selection

    base = FULL if args.full else QUICK
    selection = Selection(args.layers or base.layers, args.heads or base.heads)
    config = EvalConfig(
        datasets=args.datasets, selection=selection, device=args.device, out=args.out, policies=args.policies,
        matched=not args.no_matched, sweep=not args.no_sweep, ablation=not args.no_ablation,
        restart=args.restart, progress=not args.quiet,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        run = run_eval(config, log=log)
    except KeyboardInterrupt:
        log(f"\ninterrupted: finished rows are in {args.out / 'eval.json'}; run the same command to resume")
        return 130
    except (QKVError, OSError) as exc:
        log(f"qkv eval: error: {exc}")
        return 1
    print(format_table(run.results, run.labels))
    phases = ", ".join(f"{k} {format_duration(v)}" for k, v in run.phases.items())
    p = run.process
    print(
        f"\n{len(run.results)} rows ({run.reused} reused from an earlier run) on {args.device}: {phases}; "
        f"process user {p['user_s']:.0f} s, sys {p['sys_s']:.0f} s, peak memory {p['peak_rss_gb']:.1f} GB, "
        f"{p['minor_faults'] / 1e6:.1f} M minor page faults"
    )
    print(f"wrote {args.out / 'eval.json'}, {args.out / 'eval.md'} and {args.out / 'frontier.png'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from qkv.caches.presets import OVERRIDES, PRESETS
    from qkv.spec import KINDS

    print("presets:")
    for name, (spec, text) in PRESETS.items():
        print(f"  {name:9s} {text}\n            {spec}")
    print("\ncomponents:")
    for kind, registry in KINDS.items():
        print(f"  {kind:10s} {', '.join(registry.list())}")
    print("\noverrides: " + ", ".join(OVERRIDES))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qkv.caches.presets import list_policies
    from qkv.realdata import list_datasets

    datasets, presets = list_datasets(), list_policies()
    parser = _Parser(prog="qkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ev = sub.add_parser(
        "eval", help="compare every policy on real K/V (table, JSON, Markdown, PNG)",
        description=EVAL_DESCRIPTION.format(quick=QUICK_COST, full=FULL_COST, build=BUILD_COST),
        formatter_class=_HelpFormatter,
    )
    ev.add_argument("--full", action="store_true", help="every layer and head (default: the quick subset)")
    ev.add_argument("--datasets", type=_names("dataset", datasets), default=tuple(datasets),
                    help=f"comma-separated, from: {', '.join(datasets)} (default: all)")
    ev.add_argument("--policies", type=_names("preset", presets),
                    help=f"comma-separated presets, from: {', '.join(presets)} (default: all)")
    ev.add_argument("--layers", type=_positive, help="the first N layers of each dataset (default: 1; --full: all)")
    ev.add_argument("--heads", type=_positive, help="the first N heads of each layer (default: 2; --full: all)")
    ev.add_argument("--no-matched", action="store_true", help="skip the presets fitted to RTN's bits")
    ev.add_argument("--no-sweep", action="store_true", help="skip the bit-width sweeps")
    ev.add_argument("--no-ablation", action="store_true", help="skip the qvg-ref -> qvg steps")
    ev.add_argument("--device", type=_device, default="auto",
                    help="auto, cpu, cuda or cuda:<index> (default: auto, the GPU when there is one)")
    ev.add_argument("--out", type=Path,
                    help="output folder (default: results/eval/quick, or results/eval/full with --full)")
    ev.add_argument("--restart", action="store_true", help="recompute every row instead of resuming from --out")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_eval, check=_check_eval)
    ls = sub.add_parser("list", help="presets, components and overrides")
    ls.set_defaults(func=cmd_list, check=None)
    return parser


def _check_eval(args: argparse.Namespace) -> str | None:
    """Checks that need the other arguments; fills in the default output folder."""
    if args.out is None:
        args.out = Path("results") / "eval" / ("full" if args.full else "quick")
    return _writable_folder(args.out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = args.check(args) if args.check else None
    if problem:
        parser.exit(2, f"qkv {args.command}: error: {problem} (see qkv {args.command} --help)\n")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
