"""Report of the noise-tolerance benchmark: results.json, tables and the plot."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from noise_tolerance_settings import (
    IMBALANCE_NOISE,
    LABELS,
    LR_SOURCE,
    LR_SOURCE_ORDER,
    NOISE_LEVELS,
    REFERENCE,
    Config,
    Setting,
    axis_points,
)
from PIL import Image
from seed_stats import mean_std


def to_report(result: dict[str, Any], cfg: Config, seconds: float) -> dict[str, Any]:
    """The content of results.json.

    ``{criterion: {setting: [per-seed linear-probe mIoU]}}`` plus ``kmeans`` (same
    layout), ``settings``, ``seeds``, ``lr``, ``lr_sweep``, ``init`` (the untrained
    student), ``diagnostics`` (``{criterion: {setting: {seed: {...}}}}``),
    ``config``, ``seconds`` (wall) and ``cpu_seconds`` (summed over all runs).
    """
    runs = result["runs"]
    settings: list[Setting] = result["settings"]

    def scores(key: str) -> dict[str, dict[str, list[float]]]:
        return {
            name: {
                s.name: [by_seed[seed]["scores"][key] for seed in sorted(by_seed)]
                for s in settings
                if (by_seed := runs[name].get(s.name)) is not None
            }
            for name in runs
        }

    report: dict[str, Any] = dict(scores("linear_probe"))
    report["kmeans"] = scores("kmeans")
    report["settings"] = [
        {
            "name": s.name,
            "axis": s.axis,
            "noise": s.noise,
            "alpha": NOISE_LEVELS[s.noise],
            "share": s.share,
        }
        for s in settings
    ]
    report["seeds"] = sorted(result["init"])
    report["lr"] = result["lr"]
    report["lr_sweep"] = {
        c: {f"{lr:g}": v for lr, v in d.items()} for c, d in result["lr_sweep"].items()
    }
    report["init"] = {str(seed): r for seed, r in result["init"].items()}
    report["diagnostics"] = {
        name: {
            setting: {
                str(seed): {k: v for k, v in r.items() if k != "scores"}
                for seed, r in by_seed.items()
            }
            for setting, by_seed in by_setting.items()
        }
        for name, by_setting in runs.items()
    }
    report["config"] = asdict(cfg)
    report["seconds"] = seconds
    report["cpu_seconds"] = result["cpu_seconds"]
    return report


def criteria_of(report: dict[str, Any]) -> list[str]:
    return [name for name in LABELS if name in report]


def settings_of(report: dict[str, Any]) -> list[Setting]:
    return [Setting(s["noise"], s["share"], s["axis"]) for s in report["settings"]]


def scores_of(
    report: dict[str, Any], name: str, setting: Setting, key: str
) -> list[float] | None:
    """Per-seed mIoU in percent (``None`` if the criterion did not run it)."""
    table = report[name] if key == "linear_probe" else report["kmeans"][name]
    values = table.get(setting.name)
    return None if values is None else [100 * v for v in values]


def column(setting: Setting) -> str:
    if setting.axis == "noise":
        return f"noise {setting.noise}"
    return f"{setting.share} same-class"


def score_table(report: dict[str, Any], key: str) -> str:
    """Criteria x settings: mean +- std over seeds of the mIoU in percent."""
    settings = settings_of(report)
    lines = [
        "| criterion (lr) | " + " | ".join(map(column, settings)) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    m, s = mean_std([100 * r[key] for r in report["init"].values()])
    cells = [f"{m:.1f} ± {s:.1f}"] * len(settings)
    lines.append("| untrained student | " + " | ".join(cells) + " |")
    for name in criteria_of(report):
        cells = []
        for setting in settings:
            values = scores_of(report, name, setting, key)
            if values is None:
                cells.append("=")
                continue
            m, s = mean_std(values)
            cells.append(f"{m:.1f} ± {s:.1f}")
        label = f"{LABELS[name]} ({report['lr'][name]:g})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_settings(settings: list[Setting]) -> list[Setting]:
    """The two heaviest noise levels and the strongest imbalance."""
    return axis_points(settings, "noise")[-2:] + axis_points(settings, "imbalance")[-1:]


def verdict_table(report: dict[str, Any]) -> str:
    """ContinuousAPLoss minus each alternative where the claim is about.

    Linear probe, percentage points: the mean difference, whether it exceeds the
    seed spread (the larger standard deviation of the two), the per-seed
    differences.
    """
    if REFERENCE not in report:
        return ""
    targets = verdict_settings(settings_of(report))
    lines = [
        "| ContinuousAPLoss minus | " + " | ".join(map(column, targets)) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for name in criteria_of(report):
        if name == REFERENCE:
            continue
        cells = []
        for setting in targets:
            a = scores_of(report, REFERENCE, setting, "linear_probe")
            b = scores_of(report, name, setting, "linear_probe")
            if a is None or b is None:
                cells.append("=")
                continue
            diff = statistics.mean(a) - statistics.mean(b)
            spread = max(mean_std(a)[1], mean_std(b)[1])
            verdict = "within spread"
            if abs(diff) > spread:
                verdict = "beats" if diff > 0 else "loses"
            per = ", ".join(f"{x - y:+.1f}" for x, y in zip(a, b))
            cells.append(f"{diff:+.1f} {verdict} ({per})")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(report: dict[str, Any]) -> str:
    """Teacher statistics per setting and misleading gradient shares."""
    settings = settings_of(report)
    diagnostics = report["diagnostics"]
    full = next(d for d in diagnostics.values() if len(d) == len(settings))
    lines = [
        "| setting | same-class target | different-class target | midpoint | "
        "pairs misclassified by the midpoint / by 0.5 |",
        "|---|---:|---:|---:|---:|",
    ]
    for setting in settings:
        stats = [r["teacher"] for r in full[setting.name].values()]
        mean = {k: statistics.mean(s[k] for s in stats) for k in stats[0]}
        lines.append(
            f"| {setting.name} | {mean['same']:.2f} | {mean['different']:.2f} | "
            f"{mean['midpoint']:.2f} | {100 * mean['error_at_midpoint']:.0f}% / "
            f"{100 * mean['error_at_half']:.0f}% |"
        )
    lines += [
        "",
        "Misleading gradient share (%) at the initial / trained student:",
        "",
        "| criterion | " + " | ".join(map(column, settings)) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    for name in criteria_of(report):
        cells = []
        for setting in settings:
            if setting.name not in diagnostics[name]:
                cells.append("=")
                continue
            runs = list(diagnostics[name][setting.name].values())
            a = statistics.mean(x["misleading_init"] for x in runs)
            b = statistics.mean(x["misleading_trained"] for x in runs)
            cells.append(f"{100 * a:.0f} / {100 * b:.0f}")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Quality vs noise and vs imbalance, one line per criterion.

    The band is the seed spread (mean +- std); fixed-decision variants are dotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = settings_of(report)
    metric_names = {"linear_probe": "linear probe", "kmeans": "k-means"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharey="row")
    for row, key in enumerate(metric_names):
        for col, axis in enumerate(("noise", "imbalance")):
            ax = axes[row, col]
            points = axis_points(settings, axis)
            for name in criteria_of(report):
                xs, mean, std = [], [], []
                for x, setting in enumerate(points):
                    values = scores_of(report, name, setting, key)
                    if values is not None:
                        m, s = mean_std(values)
                        xs.append(x)
                        mean.append(m)
                        std.append(s)
                color = f"C{LR_SOURCE_ORDER.index(LR_SOURCE[name])}"
                ax.plot(
                    xs,
                    mean,
                    ":" if name.endswith("_fixed") else "-",
                    color=color,
                    lw=2.5 if name == REFERENCE else 1.2,
                    marker="o",
                    ms=3,
                    label=LABELS[name],
                )
                low = np.array(mean) - np.array(std)
                ax.fill_between(
                    xs, low, low + 2 * np.array(std), color=color, alpha=0.1
                )
            init = [100 * r[key] for r in report["init"].values()]
            ax.axhline(
                statistics.mean(init),
                color="grey",
                ls="--",
                lw=1,
                label="untrained student",
            )
            ax.set_xticks(range(len(points)))
            if axis == "noise":
                ax.set_xticklabels(
                    [f"{s.noise}\n(alpha {NOISE_LEVELS[s.noise]})" for s in points]
                )
                title = "noise (50% same-class pairs)"
            else:
                ax.set_xticklabels([f"{s.share} same-class" for s in points])
                title = f"imbalance (noise {IMBALANCE_NOISE})"
            ax.set_title(f"{metric_names[key]} vs {title}", fontsize=10)
            ax.set_ylabel(f"{metric_names[key]} mIoU (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(
        "Criteria in CoTAPLoss against teacher noise and imbalance "
        f"(mean ± std over {len(report['seeds'])} seeds)"
    )
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path, dpi=72)
    plt.close(fig)
    # A 128-colour palette keeps the PNG small enough to commit (about 4x smaller).
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def write_report(report: dict[str, Any], out: Path) -> str:
    """Writes table.md and the PNG (results.json must exist); returns the text."""
    cfg = report["config"]
    header = (
        "Noise tolerance of correspondence criteria in CoTAPLoss: "
        f"{len(report['seeds'])} seed(s), {cfg['steps']} steps, "
        f"{cfg['num_train']} training scenes; {report['seconds'] / 60:.1f} min wall, "
        f"{report['cpu_seconds'] / 60:.1f} min of CPU time in the runs."
    )
    text = "\n\n".join(
        part
        for part in (
            header,
            "Linear-probe mIoU (%), mean ± std over seeds (= not run: the "
            "decision equals the calibrated one):",
            score_table(report, "linear_probe"),
            "k-means mIoU (%):",
            score_table(report, "kmeans"),
            "ContinuousAPLoss minus each alternative, linear probe (pp; per seed):",
            verdict_table(report),
            "Teacher targets of the ranked lists against the clean classes:",
            diagnostics_table(report),
        )
        if part
    )
    (out / "table.md").write_text(text + "\n")
    plot(report, out / "noise_tolerance.png")
    return text
