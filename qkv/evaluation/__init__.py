"""The evaluation behind ``qkv eval``: every policy on real K/V, at true bits per element."""

from qkv.evaluation.metrics import relative_mse, snr_db
from qkv.evaluation.run import EvalConfig, EvalRun, run_eval
from qkv.evaluation.runner import Result, evaluate
from qkv.evaluation.selection import FULL, QUICK, Selection

__all__ = [
    "FULL", "QUICK", "EvalConfig", "EvalRun", "Result", "Selection", "evaluate", "relative_mse", "run_eval", "snr_db",
]
