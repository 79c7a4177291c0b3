"""Table of the device check: one row per measure."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def table(report: dict[str, Any]) -> str:
    """One Markdown table: section | measure | value | status."""
    wanted = {
        "sync": ["training_step", "fast_loss_n", "sync_debug_mode"],
        "loss": ["crossover_n", "auto_vs_best_max", "auto_vs_best_max_at_n"],
        "step": [
            "batch_pairs",
            "images_per_s",
            "peak_gib",
            "ratio_cotap_to_dino",
        ],
        "filter": ["time_ratio", "memory_ratio", "with", "without"],
        "mmseg": ["iterations_per_s", "batch", "img_size", "peak_gib"],
        "compile": [
            "backend",
            "compile_and_first_steps_s",
            "images_per_s",
            "speedup",
            "graph_breaks",
        ],
    }
    lines = ["| section | measure | value | status |", "| --- | --- | --- | --- |"]
    for section, keys in wanted.items():
        result = report["sections"].get(section, {"status": "not run"})
        status = f"{result['status']} ({result.get('seconds', 0)} s)"
        shown = [k for k in keys if k in result] or ["-"]
        for key in shown:
            value = _fmt(result[key]) if key in result else "-"
            lines.append(f"| {section} | {key} | {value} | {status} |")
            status = ""
    for row in report["sections"].get("loss", {}).get("rows", []):
        times = ", ".join(
            f"{name} {row[name + '_s'] * 1e3:.2f} ms"
            for name in ("dense", "fast", "auto")
            if row[name + "_s"] is not None
        )
        lines.append(
            f"| loss | n={row['n']} | {times}; auto={row['auto_path']}, "
            f"auto/best {row['auto_vs_best']:.2f} | |"
        )
    return "\n".join(lines)
