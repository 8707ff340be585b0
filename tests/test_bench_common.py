"""``benchmarks/common.py``'s paired ratio: the median of per-pair ratios and its bootstrap interval."""

import pathlib
import random
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))
common = pytest.importorskip("common")


def test_a_steady_ratio_is_found_inside_a_narrow_interval():
    rng = random.Random(1)
    base = [rng.uniform(5, 15) for _ in range(256)]  # a host whose pace drifts from step to step
    times = [b * 1.03 * rng.uniform(0.99, 1.01) for b in base]
    r = common.paired_ratio(times, base)
    assert r["low"] <= r["median"] <= r["high"]
    assert 1.025 < r["low"] and r["high"] < 1.035  # the drift cancels in each pair


def test_noisy_pairs_give_a_wide_interval_and_mismatched_lists_raise():
    rng = random.Random(2)
    base = [10.0] * 64
    times = [10.0 * rng.uniform(0.7, 1.3) for _ in base]
    r = common.paired_ratio(times, base)
    assert r["high"] - r["low"] > 0.05 and r["low"] < 1.0 < r["high"]
    with pytest.raises(ValueError, match="3 times against 2"):
        common.paired_ratio([1.0, 1.0, 1.0], [1.0, 1.0])
