"""The report of ``lightly-cotap eval``: the printed table and the JSON form."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

#: Evaluations that ``--skip`` accepts (keys of the report).
EVALUATIONS = ("linear_probe", "kmeans", "overclustering", "retrieval")


def format_report(report: dict[str, Any]) -> str:
    """Formats the metrics of an evaluation report as a Markdown table.

    Args:
        report: The dict returned by
            :func:`~lightly_cotap.eval.command.run_eval`.

    Returns:
        A table with one row per evaluation (mIoU and pixel accuracy in percent), then
        the per-class IoU of every evaluation.
    """
    names = [n for n in EVALUATIONS if n in report]
    lines = [
        "| evaluation | mIoU (%) | pixel acc. (%) | seconds |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        r = report[name]
        lines.append(
            f"| {name} | {100 * r['miou']:.2f} | {100 * r['pixel_accuracy']:.2f} | "
            f"{r.get('seconds', float('nan')):.1f} |"
        )
    class_names = report.get("settings", {}).get("class_names")
    if names:
        num = len(report[names[0]]["iou_per_class"])
        labels = class_names or [str(c) for c in range(num)]
        lines += ["", "| class | " + " | ".join(names) + " |"]
        lines.append("|---|" + "---:|" * len(names))
        for c in range(num):
            cells = []
            for name in names:
                v = report[name]["iou_per_class"][c]
                cells.append(
                    "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"
                )
            lines.append(f"| {labels[c]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """A copy of a report that ``json`` writes: tensors and NumPy scalars as numbers.

    Args:
        value: A report or a value in it.

    Returns:
        Dicts with string keys, lists, numbers and strings; non-finite floats become
        None and paths strings.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
