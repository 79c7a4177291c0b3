"""Table of the image-level benchmark: kNN accuracy of each method against its base."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from seed_stats import format_mean_std


@dataclass
class Row:
    name: str
    base: str | None
    accuracies: list[float] = field(default_factory=list)
    seconds_per_step: list[float] = field(default_factory=list)


def markdown(rows: list[Row]) -> str:
    by_name = {r.name: r for r in rows}
    lines = [
        "| method | base | kNN top-1 % (mean ± std) | Δ vs base (paired) | per seed | s / step |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        delta = "—"
        if row.base is not None:
            base = by_name[row.base].accuracies
            diffs = [a - b for a, b in zip(row.accuracies, base)]
            delta = format_mean_std(diffs)
            delta = ("+" if statistics.fmean(diffs) >= 0 else "") + delta
        per_seed = ", ".join(f"{a:.1f}" for a in row.accuracies)
        speed = (
            f"{statistics.fmean(row.seconds_per_step):.2f}"
            if row.seconds_per_step
            else "—"
        )
        lines.append(
            f"| {row.name} | {row.base or '—'} | {format_mean_std(row.accuracies)} | {delta} "
            f"| {per_seed} | {speed} |"
        )
    return "\n".join(lines)
