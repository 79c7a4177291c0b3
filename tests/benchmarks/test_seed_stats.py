from __future__ import annotations

import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_mean_std_is_the_sample_deviation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from seed_stats import format_mean_std, mean_std

    mean, std = mean_std([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(math.sqrt((4 + 1 + 9) / 2))
    assert format_mean_std([1.0, 2.0, 6.0]) == "3.0 ± 2.6"


def test_one_seed_has_no_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A single seed (e.g. ``--seeds 0``) prints a spread of 0 instead of failing."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from seed_stats import format_mean_std, mean_std

    assert mean_std([12.5]) == (12.5, 0.0)
    assert format_mean_std([12.25]) == "12.2 ± 0.0"
