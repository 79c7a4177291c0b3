"""Mean and spread over seeds, as the benchmark tables print them."""

from __future__ import annotations

import statistics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the deviation of a single seed is 0."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.mean(values), std


def format_mean_std(values: list[float]) -> str:
    """``"mean ± std"`` with one decimal."""
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"
