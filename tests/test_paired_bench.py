"""bench/paired.py: the sign test and the paired bootstrap of a success ratio."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("paired", Path(__file__).parents[1] / "bench" / "paired.py")
paired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired)


def test_sign_test_matches_exact_binomial():
    assert paired.sign_test(0, 0) == 1.0
    assert paired.sign_test(5, 0) == pytest.approx(2 / 32)
    assert paired.sign_test(3, 3) == 1.0


def test_bootstrap_ratio_brackets_the_estimate_and_is_degenerate_for_identical_runs():
    a = [True] * 80 + [False] * 20
    assert paired.bootstrap_ratio(a, a, n=500) == (1.0, 1.0)
    b = [True] * 60 + [False] * 20 + [True] * 10 + [False] * 10  # 70 wins against 80
    lo, hi = paired.bootstrap_ratio(a, b, n=2000)
    assert 0.7 < lo < 70 / 80 < hi < 1.05
