"""The evaluation behind ``qkv eval``: every policy on real K/V, at true bits per element."""

from qkv.evaluation.metrics import relative_mse, snr_db
from qkv.evaluation.runner import Result, evaluate

__all__ = ["Result", "evaluate", "relative_mse", "snr_db"]
